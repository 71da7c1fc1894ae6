"""fsync helpers for files that must survive a power cut, not only a kill: label sidecars and manifests
(collections/writers.py) and training checkpoints (training/checkpoint.py) both rename finished files into
place, and a rename is durable only once its folder is fsynced. Here, below both, because data/ is the one
package each of them may import (DESIGN §3)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to the disk (a file another writer, e.g. safetensors, wrote and closed)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable; a no-op where folders cannot be opened or synced (some filesystems,
    Windows): the rename itself is still atomic there."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
