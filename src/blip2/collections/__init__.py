"""Bulk work over folders of images: labeling with sidecar files or a manifest (resumable), and the readers
under it. `from blip2.collections import find_images, decode_stream, label_images`.

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
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blip2.collections' has no attribute {name!r}")


__all__ = list(_EXPORTS)
