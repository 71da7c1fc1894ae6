"""Training checkpoints: everything a run needs to continue exactly where it stopped.

One checkpoint is a folder `step_000123/` under the run's `checkpoints/`:
    trainable.safetensors   the trainable weights (the frozen parts are rebuilt from the config)
    state.pt                optimizer, scheduler, grad scaler, step, data position, every rank's RNG
                            states (python, numpy, torch CPU/CUDA, plus named generators), the config
Written atomically: both files go into a temporary folder, are flushed and fsynced, and the folder is then
renamed into place with os.replace, so a crash leaves either the old set of checkpoints or the new one,
never a half-written folder. Only the last `keep_last` folders are kept. `state.pt` loads with
`torch.load(weights_only=True)`: it holds tensors, numbers, strings, lists and dicts only.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import logging

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
_NAME = re.compile(r"^step_(\d+)$")


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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train (requires_grad), detached, contiguous, on the CPU."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE).exists() and (p / WEIGHTS).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems (and Windows) cannot open directories: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write `step_{step}/` atomically under `directory`, then delete all but the newest `keep_last`."""
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
        _fsync_file(tmp / WEIGHTS)
        _fsync_dir(tmp)
        if final.exists():  # saving the same step again (a resumed run that ends where it started)
            old = directory / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of a checkpoint folder; a clear error when it is not one."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, STATE) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a training checkpoint (missing {', '.join(missing)})")
    weights = load_file(str(folder / WEIGHTS))
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    return weights, state


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the model's trainable parameters; every one must be there, nothing extra."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
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
    """`--resume` -> the checkpoint folder to continue from: "latest" looks in output_dir/checkpoints (None,
    with a warning, when there is none yet), anything else is a folder path."""
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(Path(output_dir) / "checkpoints")
        if found is None:
            logging.getLogger("blip2.train").warning(
                "resume=latest: no checkpoint in %s/checkpoints yet, starting from step 0", output_dir
            )
        return found
    return Path(resume)
