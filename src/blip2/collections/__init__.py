"""Bulk work over folders of images: labeling with sidecar files or a manifest (resumable), the photo index and
its search, and the readers under them. `from blip2.collections import label_images, update_index, search`.

Names load on first use: `blip2 --help` imports the command modules here, which must not pull in torch.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "IMAGE_EXTENSIONS": "blip2.collections.reader",
    "Decoded": "blip2.collections.reader",
    "find_images": "blip2.collections.reader",
    "decode_stream": "blip2.collections.reader",
    "describe_error": "blip2.collections.reader",
    "label_images": "blip2.collections.label",
    "LabelReport": "blip2.collections.label",
    "read_manifest": "blip2.collections.writers",
    "PhotoIndex": "blip2.collections.index",
    "update_index": "blip2.collections.index",
    "model_fingerprint": "blip2.collections.index",
    "IndexMismatchError": "blip2.collections.index",
    "search": "blip2.collections.search",
    "Hit": "blip2.collections.search",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blip2.collections' has no attribute {name!r}")


__all__ = list(_EXPORTS)
