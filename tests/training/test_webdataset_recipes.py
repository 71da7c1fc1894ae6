"""The stage recipes on webdataset tar shards (`data.format: webdataset`, brace-expanded `data.path`): train,
count the corrupt image, resume exactly, export. The recipes still need the few lines that call
`blip2.data.webdataset.webdataset_loader` (proposed to the lead): until then these tests are expected to fail."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import blip2
import tiny_models as tm
from conftest import losses_close, save_tiny_checkpoint, shape_image, COLORS, SHAPES
from blip2.training.config import parse_args



def write_shards(folder: Path, shards: int = 4, per_shard: int = 4) -> str:
    """Shards of (png, txt) samples; sample 6 has a broken image. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                color, shape = COLORS[n % 3], SHAPES[(n // 3) % 3]
                buf = io.BytesIO()
                shape_image(color, shape, seed=n).save(buf, format="PNG")
                for ext, data in (("png", b"\x89PNG broken" if n == 6 else buf.getvalue()),
                                  ("txt", f"a {color} {shape}".encode())):
                    info = tarfile.TarInfo(f"{n:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / ("{000000..%06d}.tar" % (shards - 1)))


def quick(path: str) -> list[str]:
    return ["data.format=webdataset", f"data.path={path}", "steps=6", "batch_size=2", "lr=1e-3", "save_every=0",
            "progress=false", "plot=false", "device=cpu", "log_every=1"]


def test_stage1_on_webdataset_shards_resumes_exactly(tmp_path):
    from blip2.recipes import stage1

    args = [f"init_from={save_tiny_checkpoint(tmp_path / 's1')}", *quick(write_shards(tmp_path / "shards"))]
    full = stage1.run(parse_args(stage1.Stage1Config, args + [f"output_dir={tmp_path / 'full'}"], prog="t"))
    assert len(full.losses) == 6 and full.skipped_images == 1
    first = stage1.run(parse_args(stage1.Stage1Config, args + [f"output_dir={tmp_path / 'split'}", "stop_after=3"],
                                  prog="t"))
    rest = stage1.run(parse_args(stage1.Stage1Config, args + [f"output_dir={tmp_path / 'split'}", "resume=latest"],
                                 prog="t"))
    assert losses_close(first.losses + rest.losses, full.losses)
    model = blip2.load(full.final_dir)
    assert len(model.itm(tm.images(1)[0], ["a red circle"])) == 1


def test_stage2_captions_on_webdataset_shards(tmp_path):
    from blip2.recipes import stage2

    hf = tmp_path / "hf"
    tm.save_generation_model(hf, "opt")
    args = [f"init_from={hf}", "prompt=a photo of", *quick(write_shards(tmp_path / "shards"))]
    result = stage2.run(parse_args(stage2.Stage2Config, args + [f"output_dir={tmp_path / 'run'}"], prog="t"))
    assert len(result.losses) == 6 and result.skipped_images == 1
    model = blip2.load(result.final_dir)
    assert len(model.caption(tm.images(1)[0], num_beams=1, max_new_tokens=2)) == 1
