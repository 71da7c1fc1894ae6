"""Typed recipe configs: dataclasses filled from a YAML file and `key=value` overrides (DESIGN §4).

    cfg = load_config(Stage1Config, "configs/stage1.yaml", ["steps=100", "data.path=pairs.jsonl"])

Several files layer: `load_config(cls, ["configs/finetune_caption.yaml", "mine.yaml"])` (or `--config` given
twice) reads them in order, merging mappings key by key, so a later file only names what it changes
(`data: {path: ...}` keeps the earlier file's other `data` keys; `init_from: null` removes a setting).
Dotted keys reach nested dataclasses (`data.batch_size`) and dict fields (`model.qformer.hidden_size`).
Override values are parsed as YAML (`lr=1e-4`, `betas=[0.9,0.98]`, `resume=null`) and then coerced to the
field's type. Unknown keys are errors that name the key, the known keys and the closest match.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 and 1E+6 as floats (YAML 1.1 wants a dot: 1.0e-4), so inline model
    configs (transformers' layer_norm_eps: 1e-06) and overrides keep their numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A recipe config is wrong: unknown key, bad value, missing file. The message names the key."""


def _hint(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(key: str, where: str, known: Sequence[str]) -> ConfigError:
    return ConfigError(f"unknown key {key!r} in {where}{_hint(key, known)}; known keys: {', '.join(sorted(known))}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML) as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Exact-type members first, so `str | dict` keeps a str and `int | None` keeps an int.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: not _matches(value, a)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)  # also "1e-4", which YAML 1.1 reads as a string
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _matches(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is not None or _is_dataclass_type(tp):
        base = typing.get_origin(tp) or dict
        return isinstance(value, base) or (base in (tuple, list) and isinstance(value, (list, tuple)))
    return isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """A dataclass from a (nested) dict; unknown keys are ConfigErrors."""
    where = where or cls.__name__
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, where, list(fields))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != cls.__name__ else key)
    try:
        return cls(**kwargs)
    except TypeError as err:
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"{where} needs value(s) for {', '.join(missing) or '?'} ({err})") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside `data`, checking each step against the dataclass fields of `cls`."""
    parts = dotted.split(".")
    node, tp, path = data, cls, []
    for i, part in enumerate(parts):
        path.append(part)
        last = i == len(parts) - 1
        if _is_dataclass_type(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                where = ".".join(path[:-1]) or cls.__name__
                raise _unknown(part, where, list(hints))
            tp = _strip_optional(hints[part])
        else:
            tp = Any  # inside a free-form dict (e.g. an inline model config): any key goes
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {'.'.join(path)} is {child!r}, not a mapping")
        node = child


def _strip_optional(tp: Any) -> Any:
    """`X | None` -> X when X is a dataclass or dict (so dotted keys can descend into it)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in args:
            if _is_dataclass_type(a):
                return a
        if any(typing.get_origin(a) is dict or a is dict for a in args):
            return dict
    return tp


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """["a.b=1", "lr=1e-4"] -> [("a.b", 1), ("lr", "1e-4")]: the value is parsed as YAML."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. steps=100 or data.path=pairs.jsonl)")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has no key")
        try:
            value = _load_yaml(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` layered on `base`: mappings merge key by key (recursively), anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | Sequence[str | Path] | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> T:
    """`cls` filled from `base`, then the YAML file(s) at `path` in order, then `key=value` overrides (later
    wins; mappings merge, see `merge`)."""
    data: dict[str, Any] = dict(base or {})
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for file in paths:
        data = merge(data, read_yaml(file))
    for key, value in parse_overrides(overrides):
        _set_dotted(data, cls, key, value)
    return from_dict(cls, data)


def parse_args(cls: type[T], argv: Sequence[str] | None, prog: str, description: str = "") -> T:
    """`--config FILE [--config FILE ...] [--resume [PATH]] [key=value ...]` -> a `cls`. Several `--config`
    files layer in order (see `load_config`): the fine-tune recipes (recipes/__init__.py) put their own
    default file first, so a user's file only needs what it changes. `--print-config` prints the resolved
    config as YAML and exits."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action="append", metavar="FILE",
                        help="YAML file with the recipe's settings; give it again to layer another file on top "
                             "(mappings merge key by key, later files win)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint in output_dir, or from the folder given")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that replace the file's")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume:  # `--resume key=value`: argparse took the override
        overrides.insert(0, args.resume)
        args.resume = "latest"
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    cfg = load_config(cls, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg


def resolve_path(spec: str) -> Path:
    """A path, or "package:NAME[/sub/path]": a folder inside the installed Python package NAME (found
    without importing it, as some weight packages' __init__ needs dependencies we skip)."""
    if not spec.startswith("package:"):
        return Path(spec).expanduser()
    import importlib.util

    name, _, sub = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{spec}: the Python package {name!r} is not installed")
    return Path(list(found.submodule_search_locations)[0]) / sub
