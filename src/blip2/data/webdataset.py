"""Image-caption pairs streamed from webdataset tar shards, for corpora too big for an annotation file.

    loader, position = webdataset_loader("shards/{000000..000999}.tar", image_cfg, batch_size=32,
                                         world_size=8, rank=r, seed=0, num_workers=4)

A shard is a tar file of samples; the files of a sample share a key, the name up to the first dot of the
file name (`000123.jpg`, `000123.txt`, `000123.json`), and lie next to each other, as webdataset's
`ShardWriter` and img2dataset write them. The image is the first file with an image extension; the caption
comes from `.txt`, else from `.json`'s "caption" or "text" (a string, or a list: one drawn per visit, as
ImageTextDataset does); `.json`'s "image_id", when present, becomes the ITC image id (REFERENCE §2),
otherwise every sample is its own image. Items are ImageTextDataset's: {"pixels" (3, S, S), "text",
"image_id", "index", "skipped"}, with `index` and `image_id` stable 56-bit hashes of (shard name, key).

Sharding. `path` is brace-expanded (`{000000..000009}`, `{a,b}`; several patterns join with "::"). Every
epoch all ranks shuffle the shard list the same way (seeded by seed and epoch); rank r reads shards
r, r + world_size, ... of it and DataLoader worker w of that rank every num_workers-th of those, so ranks and
workers read disjoint shards that together cover the corpus once per epoch. There must be at least one
shard per rank (and, for no idle workers, one per worker). The stream is endless (epoch after epoch) unless
`epochs` is given; each rank moves to its next epoch on its own, so ranks need not hold equal sample counts.

Unreadable images (and samples without an image or a caption) are skipped, counted in the next item's
`skipped`, and logged once per shard; a truncated or unreadable shard is logged and left for the next one.
Augmentation randomness is seeded by (seed, epoch, sample), so an item does not depend on the worker.
Resume: `position.set_position(micro_batches)` makes each worker skip the items it had already given (it
checks image headers there, without decoding); the stream then continues as before, exactly unless an
image whose header reads but whose data does not lies in the skipped part.

Shards are local paths, `http(s)://` URLs, or `pipe:COMMAND` (the command's stdout is the tar stream,
e.g. `pipe:aws s3 cp s3://bucket/shard-000001.tar -`), as in webdataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, UnidentifiedImageError

from blip2.data.datasets import DatasetError, collate, pre_caption
from blip2.data.images import ImageError, ImageSettings, eval_resize, load_image, normalize, train_transform

log = logging.getLogger("blip2.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


# --------------------------------------------------------------------------------------------- shards


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """"shards/{000000..000002}.tar" -> shards/000000.tar ... shards/000002.tar. Zero padding follows the
    first number; `{a,b}` lists, several braces and "::"-joined patterns work too. A list is expanded item
    by item."""
    if not isinstance(spec, str):
        return [url for item in spec for url in expand_urls(item)]
    out: list[str] = []
    for part in spec.split("::"):
        out += _expand(part.strip())
    return [u for u in out if u]


def _expand(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if match is None:
        return [text]
    head, body, tail = text[: match.start()], match.group(1), text[match.end():]
    numbers = _RANGE.fullmatch(match.group(0))
    if numbers:
        lo, hi = numbers.group(1), numbers.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [url for item in items for url in _expand(head + item + tail)]


def _is_local(url: str) -> bool:
    return not url.startswith(("pipe:", "http://", "https://"))


def _open_stream(url: str) -> tuple[IO[bytes], Callable[[], None]]:
    """A readable byte stream of shard `url` and a function that closes it."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (the user's command)

        def close() -> None:
            assert proc.stdout is not None
            proc.stdout.close()
            if proc.wait() != 0:
                log.warning("shard command %r exited with status %d", url[5:], proc.returncode)

        assert proc.stdout is not None
        return proc.stdout, close
    if url.startswith(("http://", "https://")):
        from urllib.request import urlopen

        response = urlopen(url)  # noqa: S310 (the user's URL)
        return response, response.close
    f = open(url, "rb")
    return f, f.close


def _split_name(name: str) -> tuple[str, str]:
    """"dir/000123.seg.jpg" -> ("dir/000123", "seg.jpg"): the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def read_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of shard `url`, in tar order. A shard that cannot be read
    (missing, truncated, not a tar) is logged and ends early; the samples before the damage still come."""
    key, files = None, {}
    try:
        stream, close = _open_stream(url)
    except OSError as err:
        log.warning("skipping shard %s: cannot open it (%s)", url, err)
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, ext = _split_name(member.name)
                if name_key.rpartition("/")[2].startswith(".") or not ext:
                    continue  # hidden files (e.g. macOS "._x") and files without an extension
                if key is not None and name_key != key:
                    yield key, files
                    files = {}
                key = name_key
                handle = tar.extractfile(member)
                files[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        log.warning("shard %s is damaged after %s: %s", url, f"sample {key!r}" if key else "its start", err)
        files = {}  # the sample being read may be incomplete
    finally:
        close()
    if key is not None and files:
        yield key, files


def stable_id(text: str) -> int:
    """A 56-bit integer from a string (fits int64, the same in every process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def decode_image(data: bytes, what: str) -> Image.Image:
    """Image bytes -> an RGB PIL image, or an ImageError naming `what` (load_image's rules, from memory)."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageError(f"{what} is too large to decode safely ({err}).") from err
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not in an image format PIL reads ({len(data)} bytes).") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(f"{what} is not a readable image ({type(err).__name__}: {err}).") from err
    try:
        return load_image(im)  # decodes inside load_image's error handling
    except ImageError as err:
        raise ImageError(f"{what}: {err}") from err


def _header_ok(data: bytes) -> bool:
    """Whether image bytes open (header only, no decoding): the cheap test used when skipping on resume."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width > 0 and im.height > 0
    except Exception:  # noqa: BLE001 (any failure = unreadable, as in decode_image)
        return False


def _meta(files: dict[str, bytes]) -> dict[str, Any]:
    """The sample's .json as a dict ({} when absent or not a JSON object)."""
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _image_bytes(files: dict[str, bytes]) -> bytes | None:
    ext = next((e for e in files if e.rpartition(".")[2] in IMAGE_EXTENSIONS), None)
    return files[ext] if ext is not None else None


def _caption(files: dict[str, bytes], rng: random.Random, clean_text: bool) -> str | None:
    """The caption: .txt, else .json "caption"/"text" (a list: one drawn with `rng`); None when there is none."""
    texts: Any = None
    if "txt" in files:
        texts = files["txt"].decode("utf-8", errors="replace").strip()
    elif "json" in files:
        meta = _meta(files)
        texts = meta.get("caption", meta.get("text"))
    if isinstance(texts, list):
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        texts = texts[rng.randrange(len(texts))] if texts else None
    if not isinstance(texts, str) or not texts.strip():
        return None
    return pre_caption(texts) if clean_text else texts


def _usable(files: dict[str, bytes]) -> bool:
    """An image whose header reads and a caption: the cheap test of `check_shards` and of resume skipping."""
    data = _image_bytes(files)
    return data is not None and _header_ok(data) and _caption(files, random.Random(0), False) is not None


# -------------------------------------------------------------------------------------------- dataset


class WebDataset(torch.utils.data.IterableDataset):
    """Image-caption items streamed from tar shards (see the module docstring)."""

    def __init__(self, urls: str | Sequence[str], image: ImageSettings, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, train: bool = True, clean_text: bool = True, epochs: int | None = None,
                 batch_size: int = 1):
        self.urls = expand_urls(urls)
        self.name = f"webdataset {urls if isinstance(urls, str) else self.urls[0] + ', ...'}"
        if not self.urls:
            raise DatasetError(f"{self.name}: the path names no shards")
        missing = [u for u in self.urls if _is_local(u) and not Path(u).is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DatasetError(f"{self.name}: {len(missing)} of its {len(self.urls)} shards do not exist: "
                               f"{', '.join(missing[:3])}{more}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if len(self.urls) < world_size:
            raise DatasetError(f"{self.name} has {len(self.urls)} shards for {world_size} processes: each process "
                               "needs at least one shard (write smaller shards)")
        self.image, self.rank, self.world_size, self.seed = image, rank, world_size, seed
        self.train, self.clean_text, self.epochs = train, clean_text, epochs
        self.batch_size = batch_size  # only to turn a resume position (micro-batches) into items
        self.start_batches = 0  # micro-batches this rank already read (set_position)

    # -- which shards ------------------------------------------------------------------------------------
    def epoch_shards(self, epoch: int) -> list[str]:
        """This epoch's order of all shards: the same on every rank."""
        order = list(self.urls)
        random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        return order

    def shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards that DataLoader worker `worker` (of `num_workers`) of this rank reads in `epoch`."""
        mine = self.epoch_shards(epoch)[self.rank :: self.world_size]
        return mine[worker::num_workers]

    # -- items -------------------------------------------------------------------------------------------
    def _item(self, url: str, key: str, files: dict[str, bytes], epoch: int) -> dict[str, Any]:
        """One sample -> its item; ImageError when the sample cannot train (no image, bad image, no caption)."""
        sample = f"{Path(url).name}/{key}"
        rng = random.Random(f"{self.seed}:{epoch}:{sample}")  # str seeds hash with SHA-512: stable
        data = _image_bytes(files)
        if data is None:
            raise ImageError(f"sample {sample} has no image file ({', '.join(IMAGE_EXTENSIONS)})")
        rgb = decode_image(data, f"the image of sample {sample}")
        text = _caption(files, rng, self.clean_text)
        if text is None:
            raise ImageError(f"sample {sample} has no caption (.txt, or .json 'caption'/'text')")
        out = train_transform(rgb, self.image, rng) if self.train else eval_resize(rgb, self.image)
        image_id = _meta(files).get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            image_id = sample
        image_id = image_id if isinstance(image_id, int) else stable_id(f"id:{image_id}")
        return {"pixels": normalize([out], self.image)[0], "text": text, "image_id": image_id,
                "index": stable_id(sample), "skipped": 0}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Batches go round-robin over the workers: worker w gave batches w, w + W, ... of the first start_batches.
        done_batches = max(0, -(-(self.start_batches - worker) // num_workers))
        to_skip = done_batches * self.batch_size
        skipped, epoch = 0, 0
        while self.epochs is None or epoch < self.epochs:
            shards = self.shards(epoch, worker, num_workers)
            if not shards:
                if epoch == 0:
                    log.warning("%s: DataLoader worker %d of rank %d has no shard (%d shards, %d processes x %d "
                                "workers): it stays idle", self.name, worker, self.rank, len(self.urls),
                                self.world_size, num_workers)
                return
            given = 0
            for url in shards:
                bad_logged = False
                for key, files in read_samples(url):
                    if to_skip:  # resuming: these items were trained on already
                        if _usable(files):
                            to_skip -= 1
                            given += 1
                        continue
                    try:
                        item = self._item(url, key, files, epoch)
                    except ImageError as err:
                        skipped += 1
                        if not bad_logged:
                            bad_logged = True
                            log.warning("skipping a sample in shard %s: %s (further ones in this shard are "
                                        "counted, not logged)", url, err)
                        continue
                    item["skipped"], skipped = skipped, 0
                    given += 1
                    yield item
            if given == 0:
                raise DatasetError(f"{self.name}: none of the samples in shards {', '.join(shards[:3])}"
                                   f"{' ...' if len(shards) > 3 else ''} can be used (see the warnings above)")
            epoch += 1

    def check_readable(self) -> None:
        """DatasetError unless the first shards hold a usable sample (see `check_shards`)."""
        check_shards(self.urls)


def check_shards(path: str | Sequence[str]) -> None:
    """DatasetError unless `path`'s shards exist (local ones) and the first shards hold a usable sample (an
    image whose header reads and a caption): normally costs one sample, so recipes call it before building
    the model and a wrong path fails at once."""
    urls = expand_urls(path)
    name = f"webdataset {path if isinstance(path, str) else ', '.join(urls[:2])}"
    if not urls:
        raise DatasetError(f"{name}: the path names no shards")
    missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetError(f"{name}: {len(missing)} of its {len(urls)} shards do not exist: "
                           f"{', '.join(missing[:3])}{more}")
    for url in urls[:3]:
        for _, files in read_samples(url):
            if _usable(files):
                return
    raise DatasetError(f"{name}: no usable sample (an image and a caption) in its first shards {', '.join(urls[:3])}")


class StreamPosition:
    """What the recipes' loop needs from a sampler (`set_position`, `batches_per_epoch`), for a stream.
    A stream has no known epoch length: `batches_per_epoch` is huge, so the logged epoch stays 0."""

    batches_per_epoch = sys.maxsize

    def __init__(self, dataset: WebDataset):
        self.dataset = dataset

    def set_position(self, micro_batches: int) -> None:
        """Continue after `micro_batches` micro-batches of this rank (the next loader iterator skips them)."""
        self.dataset.start_batches = micro_batches


def build_webdataset(path: str | Sequence[str], image: ImageSettings, rank: int = 0, world_size: int = 1,
                     seed: int = 0, *, train: bool = True, clean_text: bool = True, epochs: int | None = None,
                     batch_size: int = 1) -> WebDataset:
    """The stream of this rank's shards of `path` (brace-expanded; see the module docstring)."""
    return WebDataset(path, image, rank=rank, world_size=world_size, seed=seed, train=train,
                      clean_text=clean_text, epochs=epochs, batch_size=batch_size)


def webdataset_loader(
    path: str | Sequence[str], image: ImageSettings, batch_size: int, world_size: int = 1, rank: int = 0,
    seed: int = 0, num_workers: int = 0, pin_memory: bool = False, *, train: bool = True, clean_text: bool = True,
    epochs: int | None = None, check: bool = True,
) -> tuple[torch.utils.data.DataLoader, StreamPosition]:
    """A DataLoader of this rank's micro-batches from tar shards, and its position handle; a drop-in for
    `training.sampler.make_loader` in the recipes (`micro_batches(loader, position, start=micro)`).
    Batches are always full (the last partial batch of a finite stream is dropped): DDP's gathers need that."""
    dataset = build_webdataset(path, image, rank, world_size, seed, train=train, clean_text=clean_text,
                               epochs=epochs, batch_size=batch_size)
    if check:
        dataset.check_readable()
    if num_workers and len(dataset.shards(0)) < num_workers:
        log.warning("%s: rank %d reads %d shards with %d DataLoader workers: some workers stay idle",
                    dataset.name, rank, len(dataset.shards(0)), num_workers)
    # Its own generator: a loader without one draws its base seed from torch's global RNG at each new
    # iterator, which would shift dropout after a resume (as in training/sampler.make_loader).
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                                         pin_memory=pin_memory, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed + rank))
    return loader, StreamPosition(dataset)


__all__ = ["StreamPosition", "WebDataset", "build_webdataset", "check_shards", "expand_urls", "read_samples",
           "webdataset_loader"]
