"""A prefix cache across requests (issue 13), as vLLM's automatic prefix caching: the LLM's keys/values of
[soft prompt; prompt tokens; answer] of a finished request are kept, and a later request about the same image
whose tokens start the same way prefills only the rest. A chat client resends the whole conversation each
turn, so turn N then costs its new tokens, as `ChatSession` in process (pipeline.py).

Why it is exact: in a decoder-only LLM the keys/values of a position depend only on the positions before it
(models/language/kv_cache.py), and an entry is found by exactly what decides them: the image (content hash),
the soft prompt's values (compared with `torch.equal`, so a soft prompt computed in another batch, rounded
differently, is a miss rather than a near-miss) and the token ids after it. Only LLMs whose caches may be
kept and cropped (`kv_cache.can_keep`) and soft prompts that do not read the question use it; the engine
decides that. Equality with a full prefill holds up to float rounding, as for `generate` itself.

Bounded: an LRU over entries, in bytes of keys/values (on the model's device, where they were computed). An
entry whose tokens start a newer entry's tokens is dropped: the newer one answers every look-up it would.
Thread-safe: the model worker looks up and stores, `/metrics` reads the counters from handler threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from blip2.models.language import kv_cache


@dataclass
class _Entry:
    image: str  # content hash
    soft: torch.Tensor  # (Q, H): the soft prompt the keys/values were computed from
    ids: tuple[int, ...]  # token ids after the soft prompt that the cache holds
    cache: DynamicCache  # 1 row, Q + len(ids) positions
    nbytes: int


def _cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class PrefixCache:
    """(image hash, soft prompt, token ids) -> the LLM's keys/values of [soft prompt; tokens], one row."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order, oldest first
        self._next = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0  # look-ups that reused at least the soft prompt
        self.misses = 0
        self.reused_tokens = 0  # positions (soft prompt included) not prefilled again thanks to a hit
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, image: str, soft: torch.Tensor, ids: Sequence[int]) -> tuple[DynamicCache, int] | None:
        """A copy of the longest cached prefix of [soft; ids] and its length in positions (Q + n), or None.
        At least the last token of `ids` is left out: its prefill gives the first token's logits."""
        with self._lock:
            best, keep = None, -1
            for key, entry in self._entries.items():
                if entry.image != image or entry.soft.shape != soft.shape or not torch.equal(entry.soft, soft):
                    continue
                n = min(kv_cache.common_prefix(entry.ids, ids), len(ids) - 1)
                if n > keep:
                    best, keep = key, n
            if best is None or keep < 0:
                self.misses += 1
                return None
            entry = self._entries[best]
            self._entries.move_to_end(best)
            length = soft.shape[0] + keep
            copy = DynamicCache()  # plain layers, made as `update` fills them (can_keep: every layer is plain)
            for i, layer in enumerate(entry.cache.layers):
                copy.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), i)
            self.hits += 1
            self.reused_tokens += length
            return copy, length

    def put(self, image: str, soft: torch.Tensor, ids: Sequence[int], cache: DynamicCache) -> None:
        """Keep `cache` (1 row holding [soft; ids]; it is stored, not copied: the caller gives it up)."""
        if cache.get_seq_length() != soft.shape[0] + len(ids):
            raise ValueError(f"the cache holds {cache.get_seq_length()} positions, not the "
                             f"{soft.shape[0]} + {len(ids)} of its soft prompt and tokens")
        nbytes = _cache_bytes(cache) + soft.numel() * soft.element_size()
        if nbytes > self.max_bytes:
            return  # 0 bytes (off), or one conversation larger than the whole budget
        ids = tuple(ids)
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.image == image and torch.equal(entry.soft, soft) and ids[: len(entry.ids)] == entry.ids:
                    self._drop(key)  # the new entry answers every look-up this one would
            self._entries[self._next] = _Entry(image, soft, ids, cache, nbytes)
            self._next += 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

