"""A contact sheet of search hits: one self-contained HTML file (thumbnails embedded as small base64 JPEGs,
every text escaped), to open in a browser or attach to a message."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

THUMB = 192  # px, the longer side

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.2em;font-weight:600}.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;width:%dpx;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img,.missing{width:100%%;height:%dpx;object-fit:contain;background:#eee;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#999;font-size:.8em}
figcaption{font-size:.78em;margin-top:6px;line-height:1.35;word-break:break-all}
.rank{font-weight:700}.path{color:#555}""" % (THUMB, THUMB)


def thumbnail_data_url(path: str | os.PathLike, size: int = THUMB) -> str | None:
    """A data: URL of a JPEG thumbnail of the image at `path`, or None when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster on big photos
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def contact_sheet(hits: Sequence, query: str, index: str | None = None) -> str:
    """HTML for `hits` (objects or dicts with rank, path, score, itc and itm)."""
    rows = [h if isinstance(h, dict) else h.to_dict() for h in hits]
    cards = []
    for h in rows:
        url = thumbnail_data_url(h["path"])
        picture = (f'<img src="{url}" alt="{html.escape(Path(h["path"]).name)}">' if url
                   else '<div class="missing">cannot read the file</div>')
        scores = f'score {h["score"]:.4f} · cosine {h["itc"]:.4f}'
        if h.get("itm") is not None:
            scores += f' · match {h["itm"]:.3f}'
        cards.append(
            f'<figure>{picture}<figcaption><span class="rank">#{h["rank"]}</span> {scores}<br>'
            f'<a class="path" href="{html.escape(Path(h["path"]).as_uri() if Path(h["path"]).is_absolute() else h["path"])}">'
            f'{html.escape(h["path"])}</a></figcaption></figure>'
        )
    title = f"blip2 search: {query}"
    source = f" in {html.escape(index)}" if index else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(query)}</h1>"
        f"<p>{len(rows)} images{source}</p>\n<div class=\"grid\">\n" + "\n".join(cards) + "\n</div></body></html>\n"
    )


def write_contact_sheet(path: str | os.PathLike, hits: Sequence, query: str, index: str | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(contact_sheet(hits, query, index), encoding="utf-8")
    os.replace(tmp, path)
    return path
