"""Encoded images by content hash: each distinct image runs through the vision tower once, however many
questions, chat turns or requests ask about it. An LRU bounded in bytes, so a flood of distinct images
evicts old ones instead of growing without end."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class FeatureCache:
    """sha256 of the image bytes -> frozen image features (1, N, Dv). Thread-safe: request handlers look up,
    the model worker fills."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            feats = self._items.get(key)
            if feats is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return feats

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes:
            return  # a cache of 0 bytes (or a gigantic tower) caches nothing
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return
            self._items[key] = feats
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)
