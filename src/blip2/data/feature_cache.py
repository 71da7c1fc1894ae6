"""A cache of frozen image-encoder outputs: half precision, sharded .npy files, memory-mapped on read.

The frozen encoder gives the same features for an image every epoch when augmentation is off, so running it
once and reading the result back saves most of a stage-1/stage-2 step on CPU. Layout of a cache folder:

  index.json      {"version", "encoder", "shape": [N_tokens, D], "dtype", "count", "keys": [...],
                   "shards": [{"file", "start", "count"}]}
  shard-00000.npy (count, N_tokens, D) float16

Writers append in order and finish with `close()`, which writes index.json last (atomically): a folder
without index.json is an unfinished cache and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

INDEX = "index.json"
VERSION = 1


class FeatureCacheError(ValueError):
    """A cache folder that is missing, unfinished, or made by another encoder."""


def encoder_fingerprint(model) -> str:
    """Names a Blip2Model's frozen encoder and its preprocessing, so a cache is never read by another
    encoder (`data` does not import `models`: the model is only duck-typed here)."""
    cfg = model.config.vision
    digest = hashlib.sha1(repr((cfg.kind, cfg.pretrained, cfg.feature_layer, cfg.image)).encode())
    params = [p for n, p in model.vision_model.named_parameters() if not n.startswith("post_layernorm")]
    for p in params[:2] + params[-2:]:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return f"{cfg.kind}:{digest.hexdigest()[:16]}"



class FeatureCacheWriter:
    def __init__(self, folder: str | os.PathLike, encoder: str, shard_size: int = 1024):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / INDEX).unlink(missing_ok=True)
        self.encoder, self.shard_size = encoder, shard_size
        self.keys: list[str] = []
        self.shards: list[dict] = []
        self.pending: list[np.ndarray] = []
        self.shape: list[int] | None = None

    def add(self, keys: Sequence[str], features: torch.Tensor) -> None:
        """features (B, N, D) for `keys` (e.g. image paths relative to the data root)."""
        arr = features.detach().to(torch.float16).cpu().numpy()
        if self.shape is None:
            self.shape = list(arr.shape[1:])
        elif list(arr.shape[1:]) != self.shape:
            raise FeatureCacheError(f"feature shape {arr.shape[1:]} differs from the cache's {self.shape}")
        self.keys.extend(keys)
        self.pending.extend(arr)
        while len(self.pending) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, count: int) -> None:
        block, self.pending = np.stack(self.pending[:count]), self.pending[count:]
        name = f"shard-{len(self.shards):05d}.npy"
        np.save(self.folder / name, block)
        start = sum(s["count"] for s in self.shards)
        self.shards.append({"file": name, "start": start, "count": int(block.shape[0])})

    def close(self) -> Path:
        if self.pending:
            self._flush(len(self.pending))
        index = {
            "version": VERSION,
            "encoder": self.encoder,
            "shape": self.shape,
            "dtype": "float16",
            "count": len(self.keys),
            "keys": self.keys,
            "shards": self.shards,
        }
        tmp = self.folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, self.folder / INDEX)
        return self.folder


class FeatureCache:
    """Read side: `cache[key]` or `cache.get(i)` -> (N, D) float16 tensor, from memory-mapped shards."""

    def __init__(self, folder: str | os.PathLike, encoder: str | None = None):
        self.folder = Path(folder)
        index_file = self.folder / INDEX
        if not index_file.exists():
            raise FeatureCacheError(f"{self.folder} is not a finished feature cache (no {INDEX}); run `blip2 cache-features`")
        index = json.loads(index_file.read_text())
        if encoder is not None and index["encoder"] != encoder:
            raise FeatureCacheError(
                f"{self.folder} holds features of {index['encoder']!r}, not of this model's encoder {encoder!r}"
            )
        self.encoder = index["encoder"]
        self.keys: list[str] = index["keys"]
        self.position = {k: i for i, k in enumerate(self.keys)}
        self.shards = index["shards"]
        self.starts = np.array([s["start"] for s in self.shards])
        self._arrays: dict[int, np.ndarray] = {}

    @classmethod
    def for_model(cls, folder: str | os.PathLike | None, model) -> FeatureCache | None:
        """The cache at `folder` (None or "" -> None), refused unless made by `model`'s frozen encoder."""
        return cls(folder, encoder_fingerprint(model)) if folder else None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        return key in self.position

    def _array(self, shard: int) -> np.ndarray:
        if shard not in self._arrays:  # opened lazily: each DataLoader worker maps its own view
            self._arrays[shard] = np.load(self.folder / self.shards[shard]["file"], mmap_mode="r")
        return self._arrays[shard]

    def get(self, i: int) -> torch.Tensor:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        row = self._array(shard)[i - self.shards[shard]["start"]]
        return torch.from_numpy(np.array(row))  # copy out of the map: (N, D) float16

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.position:
            raise KeyError(f"{key!r} is not in the feature cache {self.folder}")
        return self.get(self.position[key])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memory maps do not travel to worker processes
        return state
