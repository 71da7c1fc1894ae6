"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One checkpoint is a folder `step_000123/` under the run's `checkpoints/`:
    trainable.safetensors   the trainable weights (the frozen parts are rebuilt from the config)
    state.pt                optimizer, scheduler, grad scaler, step, data position, every rank's RNG
                            states (python, numpy, torch CPU/CUDA, plus named generators), the config
    adapter/                (LoRA runs) the LLM's adapters in peft's format, written by the recipe's `extra`
    manifest.json           every file's size and sha256, written last
Written atomically: the files go into a temporary folder `.step_000123.tmp-PID`, are flushed and fsynced, and
the folder is then renamed into place with os.replace, so a crash leaves either the old set of checkpoints or
the new one, never a half-written folder. Only the last `keep_last` folders are kept; an old one is renamed
to `.step_000123.trash-PID` before it is deleted, so a kill mid-delete cannot leave a half-deleted `step_`
folder. `state.pt` loads with `torch.load(weights_only=True)`: it holds tensors, numbers, strings, lists and
dicts only.

Files still get damaged after the rename (a full disk under a copy, a dying node, a cut-short rsync), so a
checkpoint is trusted only once checked against its manifest: sizes when listing (cheap), sha256 too before
resuming from it (`resume_folder`), which falls back to the newest intact one. Folders from before manifests
are checked for structure instead, and loaded before they are trusted.

A run owns its output_dir: when it starts (`resume_folder`), every temporary and trash folder under
`checkpoints/` is a killed run's leftover and is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from blip2.data.durable import fsync_dir, fsync_file

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^step_(\d+)$")
# tmp: a write cut short; trash: a deletion cut short; old: the trash of writes from before that name
_LEFTOVER = re.compile(r"^\.step_\d+\.(tmp|trash|old)-\d+$")
log = logging.getLogger("blip2.train")


class CheckpointDamagedError(ValueError):
    """A checkpoint to resume from cannot be read, or none of a run's checkpoints is intact."""


# --------------------------------------------------------------------------------------------- RNG state


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's random states: python, numpy, torch (CPU and every CUDA device), named generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": py_gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


# ------------------------------------------------------------------------------------------ the folders


def trainable_state(model: torch.nn.Module, skip: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Parameters that train (requires_grad), detached, contiguous, on the CPU; `skip(name)` leaves some out
    (LoRA adapters, which the recipe stores in their own format)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if p.requires_grad and not (skip is not None and skip(n))}


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _step_folders(directory: Path) -> list[tuple[int, Path]]:
    """Every `step_N` folder, intact or not, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under `directory` whose files are all there at their full size, oldest step first.
    Sizes only: hashing every checkpoint at every listing would read gigabytes (`verify_checkpoint` does it
    for the one about to be loaded)."""
    return [p for _, p in _step_folders(Path(directory)) if verify_checkpoint(p, full=False) is None]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(folder: str | os.PathLike, full: bool = True) -> str | None:
    """None when `folder` is an intact checkpoint, else the reason it is not. Against the manifest: sizes, and
    with `full` every file's sha256. A folder from before manifests: its safetensors header must account for
    the file's size and state.pt's zip directory must be readable (a truncated file fails both); with `full`
    it is loaded, since nothing else can tell whether it reads."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, STATE) if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    if not (folder / MANIFEST).exists():
        reason = _check_structure(folder)
        if reason is None and full:
            try:
                _read(folder)
            except Exception as err:  # noqa: BLE001 - safetensors, zip and unpickling errors: no common base
                return f"unreadable ({type(err).__name__}: {err})"
        return reason
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        # every file it lists (WEIGHTS and STATE always; a LoRA run's adapter/ files too)
        expected = {name: (int(files[name]["bytes"]), str(files[name]["sha256"]))
                    for name in sorted({WEIGHTS, STATE} | set(files))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({type(err).__name__}: {err})"
    try:
        for name, (size, _) in expected.items():
            if not (folder / name).is_file():
                return f"missing {name}"
            actual = (folder / name).stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, its manifest says {size} (truncated?)"
        if full:
            for name, (_, digest) in expected.items():
                if _sha256(folder / name) != digest:
                    return f"{name} does not match the sha256 in its manifest (damaged)"
    except OSError as err:
        return f"unreadable ({err})"
    return None


def _check_structure(folder: Path) -> str | None:
    path = folder / WEIGHTS
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                return f"{WEIGHTS} has {size} bytes, less than its header's {n} (truncated?)"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"{WEIGHTS} has no readable header ({type(err).__name__}: {err})"
    if size != 8 + n + end:
        return f"{WEIGHTS} has {size} bytes, its header describes {8 + n + end} (truncated?)"
    try:
        with zipfile.ZipFile(folder / STATE) as z:  # torch.save's format; the directory is at the end
            z.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{STATE} is unreadable ({err})"
    return None


def _write_manifest(folder: Path, step: int) -> None:
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _delete(folder: Path) -> None:
    """Rename, then delete: a kill inside rmtree leaves a trash folder, not a `step_` folder missing files."""
    trash = folder.parent / f".{folder.name}.trash-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(folder, trash)
    except OSError as err:  # the new checkpoint is safe: an old one left behind must not stop training
        log.warning("could not delete the old checkpoint %s (%s)", folder, err)
        return
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(directory: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], keep_last: int = 2, extra: Callable[[Path], Any] | None = None) -> Path:
    """Write `step_{step}/` atomically under `directory`, then delete the step folders older than the newest
    `keep_last` intact ones up to `step` (damaged ones among them too). `extra(folder)` writes more files into
    the folder before the manifest is made (which then lists them too), e.g. LoRA adapters in peft's format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
        with open(tmp / STATE, "wb") as f:
            torch.save({**state, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_file(tmp / WEIGHTS)
        if extra is not None:
            extra(tmp)
            for path in tmp.rglob("*"):
                if path.is_file() and path.name not in (WEIGHTS, STATE):
                    fsync_file(path)
        _write_manifest(tmp, step)  # last: it vouches for files already on disk
        fsync_dir(tmp)
        if final.exists():  # saving the same step again (a resumed run that ends where it started)
            old = directory / f".{final.name}.trash-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        # Folders past `step` are a resume's abandoned future (say a damaged latest one it fell back from):
        # counting them could delete the checkpoint just written, so they wait to be overwritten instead.
        kept = [at for at, p in _step_folders(directory)
                if at <= step and verify_checkpoint(p, full=False) is None]
        oldest = kept[-keep_last:][0] if kept else 0
        for at, folder in _step_folders(directory):
            if at < oldest:
                _delete(folder)
    return final


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary and trash folders that killed runs left under `directory` (one full-size copy per
    kill inside a write). Only at a run's start: a run owns its output_dir, so no live writer can own them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if _LEFTOVER.match(p.name) and p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)  # every rank may be doing the same at once
    if removed:
        log.info("removed %d folder(s) left by a killed run under %s", len(removed), directory)
    return removed


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights = load_file(str(folder / WEIGHTS))
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    return weights, state


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of a checkpoint folder; a clear error when it is not one or cannot be read."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, STATE) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a training checkpoint (missing {', '.join(missing)})")
    try:
        return _read(folder)
    except Exception as err:  # noqa: BLE001 - safetensors, zip and unpickling errors: no common base
        raise CheckpointDamagedError(
            f"the checkpoint {folder} cannot be read ({type(err).__name__}: {err})"
        ) from err


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                   skip: Callable[[str], bool] | None = None) -> None:
    """Copy `weights` into the model's trainable parameters; every one must be there, nothing extra. `skip(name)`:
    parameters restored otherwise (as `trainable_state`'s)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and not (skip is not None and skip(n))}
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        more = lambda keys: "..." if len(keys) > 8 else ""  # noqa: E731
        raise ValueError(
            "the checkpoint's trainable weights do not fit this model: "
            f"missing {missing[:8]}{more(missing)}, unexpected {extra[:8]}{more(extra)}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))


def resume_folder(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """A run starts: remove what killed runs left in output_dir/checkpoints, then turn `--resume` into the
    checkpoint folder to continue from, checked in full. "latest" takes the newest intact one there, warning
    about each damaged one it passes over (None, with a warning, when there is no checkpoint yet; an error
    when there are some and none is intact); anything else is a folder path, which must be intact."""
    directory = Path(output_dir) / "checkpoints"
    remove_leftovers(directory)
    if resume is None:
        return None
    if resume != "latest":
        folder = Path(resume)
        reason = verify_checkpoint(folder)
        if reason is not None:
            raise CheckpointDamagedError(f"resume: {folder} is not an intact training checkpoint ({reason})")
        return folder
    candidates = [p for _, p in reversed(_step_folders(directory))]
    if not candidates:
        log.warning("resume=latest: no checkpoint in %s yet, starting from step 0", directory)
        return None
    reasons = []
    for folder in candidates:
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder
        reasons.append(f"{folder.name}: {reason}")
        log.warning("resume=latest: skipping the damaged checkpoint %s (%s)", folder, reason)
    raise CheckpointDamagedError(
        f"resume=latest: none of the {len(candidates)} checkpoint(s) in {directory} is intact "
        f"({'; '.join(reasons)}); move them away to start again from step 0"
    )
