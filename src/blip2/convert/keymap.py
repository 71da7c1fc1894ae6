"""Declarative state-dict key maps: a table of rules, applied in either direction, strict on both ends.

A rule pairs key patterns of layout A with key patterns of layout B. In a pattern, `{}` stands for a layer
index (digits) and `{*}` for the rest of a key (anything, used for opaque frozen LLMs). Most rules are
one-to-one renames; the few that are not (REFERENCE §8: EVA's split q/v bias, tied weights, a buffer only
one layout stores) carry a pair of tensor transforms, one per direction.

    rules = (rename("blocks.{}.norm1.weight", "layers.{}.layer_norm1.weight", group="vision"), ...)
    ours = convert(lavis_sd, rules)               # A -> B
    back = convert(ours, reverse(rules))          # B -> A

`convert` is strict (STYLE.md "Declarative conversion"): every source key must match exactly one pattern
and every key a present group needs must be there; otherwise one `KeyMapError` lists all offending keys.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

Transform = Callable[..., tuple[torch.Tensor, ...]]  # source tensors (in pattern order) -> target tensors

_PLACEHOLDER = re.compile(r"\{\*?\}")
_REGEX = {"{}": r"(\d+)", "{*}": r"(.+)"}


class KeyMapError(ValueError):
    """A state dict does not fit the key map. `unmatched` / `missing` hold every offending key."""

    def __init__(self, message: str, unmatched: Iterable[str] = (), missing: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.unmatched = sorted(unmatched)
        self.missing = sorted(missing)


@dataclass(frozen=True)
class Rule:
    """Keys `a` (layout A) correspond to keys `b` (layout B); all patterns share the same placeholders.

    `to_b` / `to_a` are None for a rename (one key each side). A side may be empty: a key that only one
    layout stores (a buffer the other re-derives) is consumed one way and created the other way, once,
    when its group is present. `optional` rules exist at some layer indices only (cross-attention every
    k-th layer, REFERENCE §1): all-or-none per layer instead of required at every layer.
    """

    a: tuple[str, ...]
    b: tuple[str, ...]
    group: str
    to_b: Transform | None = None
    to_a: Transform | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        slots = {tuple(_PLACEHOLDER.findall(p)) for p in self.a + self.b}
        if len(slots) > 1:
            raise ValueError(f"rule {self.a} <-> {self.b}: patterns use different placeholders")
        if (not self.a or not self.b) and slots != {()}:
            raise ValueError(f"rule {self.a} <-> {self.b}: a one-sided rule cannot have placeholders")
        if self.to_b is None and not (len(self.a) == len(self.b) == 1):
            raise ValueError(f"rule {self.a} <-> {self.b}: only one-to-one rules can omit transforms")


def rename(a: str, b: str, group: str, optional: bool = False) -> Rule:
    return Rule((a,), (b,), group, optional=optional)


def reverse(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """The same table read from B to A."""
    return tuple(Rule(r.b, r.a, r.group, r.to_a, r.to_b, r.optional) for r in rules)


def _compile(pattern: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern)
    slots = _PLACEHOLDER.findall(pattern)
    body = re.escape(parts[0]) + "".join(_REGEX[s] + re.escape(p) for s, p in zip(slots, parts[1:]))
    return re.compile(body + r"\Z")


def _fill(pattern: str, captures: tuple[str, ...]) -> str:
    it = iter(captures)
    return _PLACEHOLDER.sub(lambda _: next(it), pattern)


def _scope(rule: Rule) -> str | None:
    """Rules with a single `{}` (a layer index) are checked for completeness per layer; this is the
    prefix before the index, e.g. "Qformer.bert.encoder.layer." ."""
    if not rule.a or _PLACEHOLDER.findall(rule.a[0]) != ["{}"]:
        return None
    return rule.a[0].split("{}")[0]


Bucket = tuple[int, tuple[str, ...]]  # (rule number, captures)


def _match(keys: Iterable[str], rules: tuple[Rule, ...]) -> tuple[dict[Bucket, dict[int, str]], list[str]]:
    """Sort keys into buckets of (rule, captures) -> {position in rule.a: key}; return unmatched keys."""
    compiled = [(i, j, _compile(p)) for i, r in enumerate(rules) for j, p in enumerate(r.a)]
    buckets: dict[Bucket, dict[int, str]] = defaultdict(dict)
    unmatched = []
    for key in keys:
        hits = [(i, j, m.groups()) for i, j, rx in compiled if (m := rx.match(key))]
        if len(hits) > 1:  # a bug in the table, not in the checkpoint
            raise ValueError(f"key {key!r} matches several rules: {[rules[i].a[j] for i, j, _ in hits]}")
        if not hits:
            unmatched.append(key)
            continue
        i, j, caps = hits[0]
        buckets[(i, caps)][j] = key
    return buckets, unmatched


def groups_present(keys: Iterable[str], rules: Iterable[Rule]) -> set[str]:
    """Groups that at least one key belongs to (e.g. to report that the frozen ViT is absent)."""
    rules = tuple(rules)
    buckets, _ = _match(keys, rules)
    return {rules[i].group for i, _ in buckets}


def _expected(rules: tuple[Rule, ...], buckets: Collection[Bucket], present: set[str]) -> set[Bucket]:
    """Buckets that must exist given what is present: every required rule of a present group, at every
    layer index seen in its scope (across groups: the text FFN must cover the same Q-Former layers as
    the query FFN); optional rules at every index where their group has any optional rule."""
    indices: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    optional_at: dict[tuple[str, str], set[tuple[str, ...]]] = defaultdict(set)
    for i, caps in buckets:
        if (scope := _scope(rules[i])) is not None:
            indices[scope].add(caps)
            if rules[i].optional:
                optional_at[(rules[i].group, scope)].add(caps)
    expected: set[Bucket] = set()
    for i, r in enumerate(rules):
        if r.group not in present or not r.a:
            continue
        scope = _scope(r)
        if scope is None:
            if not _PLACEHOLDER.search(r.a[0]) and not r.optional:
                expected.add((i, ()))
        else:
            at = optional_at[(r.group, scope)] if r.optional else indices[scope]
            expected.update((i, caps) for caps in at)
    return expected


def convert(
    state_dict: Mapping[str, torch.Tensor],
    rules: Iterable[Rule],
    required_groups: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Map `state_dict` from layout A to layout B (use `reverse(rules)` for B to A). Pure: the input is
    not modified; renamed tensors are the same objects. Raises KeyMapError listing every unmatched and
    every missing key, and ValueError naming the keys when a transform rejects its tensors."""
    rules = tuple(rules)
    buckets, unmatched = _match(state_dict, rules)
    present = {rules[i].group for i, _ in buckets}
    missing: list[str] = []
    for i, caps in sorted(_expected(rules, buckets, present) | set(buckets)):
        got = buckets.get((i, caps), {})
        missing += [_fill(p, caps) for j, p in enumerate(rules[i].a) if j not in got]
    absent = sorted(set(required_groups) - present)
    for g in absent:
        patterns = [p for r in rules if r.group == g for p in r.a][:3]
        missing.append(f"<group {g!r}: no key like {', '.join(patterns)}>")
    if unmatched or missing:
        lines = []
        if unmatched:
            lines.append(f"{len(unmatched)} unexpected key(s): {', '.join(sorted(unmatched))}")
        if missing:
            lines.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing))}")
        raise KeyMapError("state dict does not fit the key map:\n" + "\n".join(lines), unmatched, missing)

    out: dict[str, torch.Tensor] = {}

    def emit(rule: Rule, caps: tuple[str, ...], tensors: tuple[torch.Tensor, ...], src: list[str]) -> None:
        if rule.to_b is not None:
            try:
                tensors = rule.to_b(*tensors)
            except ValueError as e:
                raise ValueError(f"cannot convert {', '.join(src) or rule.b}: {e}") from e
        for pattern, t in zip(rule.b, tensors, strict=True):
            key = _fill(pattern, caps)
            if key in out:  # a bug in the table
                raise ValueError(f"two rules produce {key!r}")
            out[key] = t

    for (i, caps), got in buckets.items():  # dict order = first key seen, so output follows input order
        src = [got[j] for j in range(len(rules[i].a))]
        emit(rules[i], caps, tuple(state_dict[k] for k in src), src)
    for r in rules:  # keys only layout B stores, created once when their group is present
        if not r.a and r.group in present:
            emit(r, (), (), [])
    return out
