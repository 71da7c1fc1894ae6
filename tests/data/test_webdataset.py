"""Streaming image-caption pairs from tar shards: items, skipped corrupt images, disjoint rank/worker shards
covering everything, exact resume, clear errors."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from blip2.data.datasets import DatasetError, pre_caption
from blip2.data.webdataset import WebDataset, check_shards, expand_urls, read_samples, webdataset_loader
from blip2.models.config import ImageConfig

IMAGE = ImageConfig(size=30)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int = 3, per_shard: int = 4, corrupt: tuple[int, int] | None = (1, 2)) -> str:
    """`shards` tar files of `per_shard` samples (png + txt, and a json with an image_id for every third);
    sample `corrupt` = (shard, position) holds broken image bytes. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    images = tm.images(shards * per_shard, size=36)
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{n:06d}"
                buf = io.BytesIO()
                images[n].save(buf, format="PNG")
                data = b"\x89PNG broken" if (s, i) == corrupt else buf.getvalue()
                _add(tar, f"{key}.png", data)
                _add(tar, f"{key}.txt", f"A Photo of Sample {n}.".encode())
                if n % 3 == 0:
                    _add(tar, f"{key}.json", json.dumps({"image_id": 1000 + n // 6}).encode())
    return str(folder / ("shard-{000000..%06d}.tar" % (shards - 1)))


def texts(items) -> set[str]:
    return {it["text"] for it in items}


def test_expand_urls():
    assert expand_urls("s/{000008..000011}.tar") == [f"s/{i:06d}.tar" for i in range(8, 12)]
    assert expand_urls("a/{x,y}-{1..2}.tar::b.tar") == ["a/x-1.tar", "a/x-2.tar", "a/y-1.tar", "a/y-2.tar", "b.tar"]
    assert expand_urls(["a.tar", "b{0..1}.tar"]) == ["a.tar", "b0.tar", "b1.tar"]


def test_items_and_skipped_images(tmp_path):
    path = write_shards(tmp_path / "shards")
    samples = list(read_samples(str(tmp_path / "shards" / "shard-000000.tar")))
    assert [k for k, _ in samples] == ["000000", "000001", "000002", "000003"]
    assert set(samples[0][1]) == {"png", "txt", "json"} and set(samples[1][1]) == {"png", "txt"}

    items = list(WebDataset(path, IMAGE, train=False, epochs=1))
    assert len(items) == 11  # 12 samples, one unreadable image
    assert sum(it["skipped"] for it in items) == 1
    assert texts(items) == {pre_caption(f"A Photo of Sample {n}.") for n in range(12) if n != 6}
    first = items[0]
    assert set(first) == {"pixels", "text", "image_id", "index", "skipped"}  # ImageTextDataset's items
    assert first["pixels"].shape == (3, 30, 30) and first["pixels"].dtype == torch.float32
    by_text = {it["text"]: it for it in items}
    assert by_text["a photo of sample 3"]["image_id"] == 1000  # the json's image_id
    assert by_text["a photo of sample 0"]["image_id"] == 1000  # ... shared: ITC positives of each other
    assert len({it["index"] for it in items}) == 11  # stable per sample, distinct
    # The same stream again: identical (augmentation is seeded by sample, not by reading order).
    again = list(WebDataset(path, IMAGE, train=True, epochs=1, seed=3))
    twice = list(WebDataset(path, IMAGE, train=True, epochs=1, seed=3))
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(again, twice))


def test_ranks_and_workers_read_disjoint_shards_covering_everything(tmp_path):
    path = write_shards(tmp_path / "shards", shards=5, per_shard=2, corrupt=None)
    for epoch in range(3):
        ranks = [WebDataset(path, IMAGE, rank=r, world_size=2, seed=7).shards(epoch) for r in range(2)]
        assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == expand_urls(path)
        workers = [WebDataset(path, IMAGE, rank=0, world_size=2, seed=7).shards(epoch, w, 2) for w in range(2)]
        assert sorted(workers[0] + workers[1]) == sorted(ranks[0]) and not set(workers[0]) & set(workers[1])
    # Epochs reshuffle which rank reads which shard.
    assert len({tuple(WebDataset(path, IMAGE, world_size=2, seed=7).shards(e)) for e in range(6)}) > 1

    # Items, through real DataLoader workers: the two ranks' items are disjoint and cover one epoch.
    seen = []
    for rank in range(2):
        loader, _ = webdataset_loader(path, IMAGE, batch_size=1, world_size=2, rank=rank, seed=7, num_workers=2,
                                      train=False, epochs=1)
        seen.append([t for batch in loader for t in batch["text"]])
    assert len(seen[0]) == len(set(seen[0])) and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"a photo of sample {n}" for n in range(10)}


def test_loader_batches_and_resume(tmp_path):
    path = write_shards(tmp_path / "shards", shards=4, per_shard=3)
    for workers in (0, 2):
        loader, position = webdataset_loader(path, IMAGE, batch_size=2, seed=1, num_workers=workers)
        stream = iter(loader)
        full = [next(stream) for _ in range(9)]  # endless: past the first epoch (11 items = 5 batches)
        assert all(b["pixels"].shape == (2, 3, 30, 30) and b["image_id"].dtype == torch.int64 for b in full)
        assert sum(b["skipped"] for b in full) >= 1
        del stream
        loader, position = webdataset_loader(path, IMAGE, batch_size=2, seed=1, num_workers=workers)
        position.set_position(4)
        resumed = iter(loader)
        for want in full[4:]:
            got = next(resumed)
            assert got["text"] == want["text"] and torch.equal(got["pixels"], want["pixels"])
        del resumed


def test_webdataset_writer_shards_read(tmp_path):
    """Shards written by the webdataset package's ShardWriter (as img2dataset's) read the same way."""
    wds = pytest.importorskip("webdataset")
    (tmp_path / "wds").mkdir()
    with wds.ShardWriter(str(tmp_path / "wds" / "part-%06d.tar"), maxcount=3) as sink:
        for n, im in enumerate(tm.images(7, size=32)):
            buf = io.BytesIO()
            im.save(buf, format="JPEG")
            sink.write({"__key__": f"s{n:04d}", "jpg": buf.getvalue(), "json": {"caption": [f"cap {n}", f"alt {n}"]}})
    items = list(WebDataset(str(tmp_path / "wds" / "part-{000000..000002}.tar"), IMAGE, train=False, epochs=1))
    assert sorted(int(it["text"].split()[1]) for it in items) == list(range(7))  # shards come shuffled
    assert {it["text"].split()[0] for it in items} <= {"cap", "alt"}


def test_errors_name_the_problem(tmp_path):
    path = write_shards(tmp_path / "shards", shards=2)
    with pytest.raises(DatasetError, match="shards do not exist"):
        WebDataset(str(tmp_path / "shards" / "shard-{000000..000003}.tar"), IMAGE)
    with pytest.raises(DatasetError, match="2 shards for 3 processes"):
        WebDataset(path, IMAGE, world_size=3)
    (tmp_path / "bad.tar").write_bytes(b"not a tar file at all" * 50)
    with pytest.raises(DatasetError, match="no usable sample"):
        check_shards(str(tmp_path / "bad.tar"))
    check_shards(path)
    # A truncated shard gives the samples before the damage, then moves on.
    data = (tmp_path / "shards" / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    keys = [k for k, _ in read_samples(str(tmp_path / "cut.tar"))]
    assert 0 < len(keys) < 4
