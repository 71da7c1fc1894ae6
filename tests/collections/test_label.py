"""label_images: sidecars and manifests hold what Blip2.caption / Blip2.ask say, bad files are recorded and
skipped, reruns resume, and the modes (skip, overwrite, append, prepend, prefix/suffix) do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import collection_files as cf
import tiny_models as tm
from blip2.collections import find_images, label_images, read_manifest
from blip2.collections.writers import TEMP_SUFFIX

GEN = {"max_new_tokens": 6}  # 5 beams (the caption default); tiny seed-2 model: labels differ between images


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import blip2

    folder = tmp_path_factory.mktemp("label") / "opt"
    tm.save_generation_model(folder, "opt", seed=2)
    return blip2.load(str(folder), device="cpu", batch_size=8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    cf.write_good(tmp_path / "imgs", 9)
    cf.write_bad(tmp_path / "imgs")
    return tmp_path / "imgs"


def _good(folder: Path) -> list[Path]:
    return sorted(folder.glob("img*.png"))


def _run(model, folder: Path, **kw):
    kw.setdefault("generation", GEN)
    kw.setdefault("workers", 2)
    kw.setdefault("progress", False)
    return label_images(model, find_images([folder]), batch_size=kw.pop("batch_size", 4), **kw)


def test_sidecars_hold_the_captions_and_bad_files_are_recorded(model, folder: Path, one_thread):
    report = _run(model, folder)
    good = _good(folder)
    expected = model.caption(good, **GEN)
    assert len(set(expected)) > 1  # the check below means something
    assert [p.with_suffix(".txt").read_text() for p in good] == expected
    assert (report.labeled, report.skipped, report.failed, report.total) == (9, 0, len(cf.BAD_KINDS), 14)
    errors = {Path(p).name: e for p, e in report.failures}
    assert set(errors) == set(cf.BAD_KINDS)
    for name, start in cf.BAD_KINDS.items():
        assert errors[name].startswith(start) and not (folder / name).with_suffix(".txt").exists()
    assert not list(folder.glob(f"*{TEMP_SUFFIX}"))
    again = _run(model, folder)  # resumable by default: labeled files are skipped, bad ones tried again
    assert (again.labeled, again.skipped, again.failed) == (0, 9, len(cf.BAD_KINDS))


def test_questions_prompts_and_batch_sizes_change_nothing(model, folder: Path, one_thread):
    good = _good(folder)
    q = "what color is it ?"
    _run(model, folder, question=q, ext=".answer", batch_size=3)
    assert [p.with_suffix(".answer").read_text() for p in good] == model.ask(good, [q] * len(good), **GEN)
    _run(model, folder, prompt="a photo of", ext=".caption", batch_size=1, workers=0)
    assert [p.with_suffix(".caption").read_text() for p in good] == model.caption(good, prompt="a photo of", **GEN)


def test_exif_rotated_jpeg_is_labeled_as_the_upright_image(model, tmp_path: Path):
    rotated, upright = cf.write_exif_pair(tmp_path)
    label_images(model, [rotated, upright], generation=GEN, workers=0, progress=False)
    assert rotated.with_suffix(".txt").read_text() == upright.with_suffix(".txt").read_text()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_manifest_rows_resume_and_retry(model, folder: Path, tmp_path: Path, suffix: str, one_thread):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"labels{suffix}"
    report = _run(model, folder, out=out, model_name="tiny")
    rows = {Path(r["path"]).name: r for r in read_manifest(out)}
    good = _good(folder)
    assert len(rows) == 14 and report.labeled == 9
    assert [rows[p.name]["label"] for p in good] == model.caption(good, **GEN)
    ok = rows[good[0].name]
    assert ok["status"] == "ok" and ok["error"] is None and ok["model"] == "tiny" and ok["task"] == "caption"
    assert ok["generation"] == {"num_beams": 5, "max_new_tokens": 6, "min_new_tokens": 1, "length_penalty": 1.0}
    for name, start in cf.BAD_KINDS.items():
        assert rows[name]["status"] == "error" and rows[name]["error"].startswith(start) and not rows[name]["label"]
    assert not list(folder.glob("*.txt"))  # a manifest run writes no sidecars

    again = _run(model, folder, out=out)  # failures are recorded once and skipped...
    assert (again.labeled, again.skipped, again.failed) == (0, 14, 0)
    retry = _run(model, folder, out=out, retry_failed=True)  # ...unless asked
    assert (retry.labeled, retry.skipped, retry.failed) == (0, 9, len(cf.BAD_KINDS))
    redo = _run(model, folder, out=out, mode="overwrite", model_name="tiny")
    assert redo.labeled == 9
    final = read_manifest(out)
    assert len(final) == 14 and {Path(r["path"]).name: r for r in final} == rows  # one row per path
    if suffix != ".parquet":
        assert len(out.read_text().strip().splitlines()) == 14 + (suffix == ".csv")  # compacted


def test_modes_prefix_suffix(model, tmp_path: Path):
    paths = cf.write_good(tmp_path, 2)
    new = model.caption(paths, **GEN)
    side = [p.with_suffix(".txt") for p in paths]
    side[0].write_text("old tags\n")
    run = dict(generation=GEN, workers=0, progress=False)
    report = label_images(model, paths, **run)  # skip: the existing sidecar stays
    assert report.skipped == 1 and side[0].read_text() == "old tags\n" and side[1].read_text() == new[1]
    label_images(model, paths[:1], mode="append", separator=", ", prefix="[", suffix="]", **run)
    assert side[0].read_text() == f"old tags, [{new[0]}]"
    label_images(model, paths[:1], mode="prepend", **run)
    assert side[0].read_text() == f"{new[0]} old tags, [{new[0]}]"
    label_images(model, paths[:1], mode="overwrite", prefix="photo, ", **run)
    assert side[0].read_text() == f"photo, {new[0]}"


def test_sidecar_names_are_checked(model, tmp_path: Path):
    cf.good_image(0).save(tmp_path / "same.png")
    cf.good_image(1).save(tmp_path / "same.jpg")
    report = label_images(model, find_images([tmp_path]), generation=GEN, workers=0, progress=False)
    assert report.labeled == 1 and "same.txt is same.jpg's" in report.failures[0][1]
    for bad in (".jpg", ".PNG", "/x"):
        with pytest.raises(ValueError, match="--ext"):
            label_images(model, [tmp_path / "same.jpg"], ext=bad, progress=False)


def test_checks_come_before_any_work(model, tmp_path: Path):
    paths = cf.write_good(tmp_path, 1)
    with pytest.raises(ValueError, match="num_beams"):
        label_images(model, paths, generation={"num_beams": 0}, progress=False)
    with pytest.raises(ValueError, match="mode"):
        label_images(model, paths, mode="merge", progress=False)
    with pytest.raises(ValueError, match="parquet|manifest"):
        label_images(model, paths, out=tmp_path / "labels.txt", progress=False)
    assert not paths[0].with_suffix(".txt").exists()


def test_a_killed_write_is_cut_and_stale_temps_removed(model, tmp_path: Path):
    paths = cf.write_good(tmp_path, 3)
    out = tmp_path / "labels.jsonl"
    label_images(model, paths[:2], out=out, generation=GEN, workers=0, progress=False)
    with open(out, "a") as f:
        f.write('{"path": "' + str(paths[2]))  # what a kill in the middle of a write leaves
    stale = tmp_path / f".img000.txt.999999999{TEMP_SUFFIX}"  # no such process: a dead run's leftover
    stale.write_text("half")
    assert len(read_manifest(out)) == 2  # readers ignore the partial line
    report = label_images(model, paths, out=out, generation=GEN, workers=0, progress=False)
    assert (report.labeled, report.skipped) == (1, 2) and not stale.exists()
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


# -- append/prepend: a killed run's rerun adds each label once ---------------------------------------------------
class _Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def _stop_at_batch(monkeypatch, batch: int, where: str) -> None:
    """Let `batch - 1` batches through, then stop the run in the next one: before its labels are generated
    ("generate"), or after they are journaled but before any is written ("write")."""
    from blip2.collections import label as label_module
    from blip2.collections import writers

    calls = {"n": 0}
    if where == "generate":
        real = label_module._generate

        def generate(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == batch:
                raise _Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(label_module, "_generate", generate)
    else:
        for cls in (writers.SidecarWriter, writers.ManifestWriter):
            real_write = cls.write

            def write(self, rows, real_write=real_write):
                calls["n"] += 1
                if calls["n"] == batch:
                    raise _Killed
                return real_write(self, rows)

            monkeypatch.setattr(cls, "write", write)


@pytest.mark.parametrize("where", ["generate", "write"])
@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_a_killed_append_run_reruns_without_doubling_labels(model, tmp_path, monkeypatch, mode, where):
    paths = cf.write_good(tmp_path / "imgs", 5)
    new = model.caption(paths, **GEN)
    side = [p.with_suffix(".txt") for p in paths]
    for i, s in enumerate(side):
        s.write_text(f"old {i}")
    run = dict(generation=GEN, workers=0, progress=False, batch_size=2, mode=mode, separator=" | ")
    with monkeypatch.context() as m:
        _stop_at_batch(m, 2, where)  # batch 1 (2 images) is written, the run dies in batch 2
        with pytest.raises(_Killed):
            label_images(model, paths, **run)
    assert [s.read_text() for s in side[2:]] == ["old 2", "old 3", "old 4"]
    assert len(list((tmp_path / "imgs").glob(".blip2-label-*.journal.jsonl"))) == 1
    report = label_images(model, paths, **run)
    want = [f"old {i} | {new[i]}" if mode == "append" else f"{new[i]} | old {i}" for i in range(5)]
    assert [s.read_text() for s in side] == want  # each image's label once, the first two from the killed run
    assert report.skipped == 2 and report.labeled == 3
    assert not list((tmp_path / "imgs").glob(".blip2-label-*"))  # a finished run leaves no journal
    label_images(model, paths[:1], **run)  # the same command again, later: appends again, as asked
    assert side[0].read_text().count(new[0]) == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_killed_append_run_into_a_manifest_reruns_without_doubling(model, tmp_path, monkeypatch, suffix):
    paths = cf.write_good(tmp_path / "imgs", 5)
    new = model.caption(paths, **GEN)
    out = tmp_path / f"labels{suffix}"
    first = dict(generation=GEN, workers=0, progress=False, batch_size=2, out=out)
    label_images(model, paths, **first, prefix="old  tags\n")  # the labels to append to (CSV: one line each)
    run = {**first, "mode": "append", "separator": ", "}
    with monkeypatch.context() as m:
        _stop_at_batch(m, 2, "write")
        with pytest.raises(_Killed):
            label_images(model, paths, **run)
    assert len(list(tmp_path.glob(".blip2-label-append-*.journal.jsonl"))) == 1  # beside the manifest
    report = label_images(model, paths, **run)
    assert report.skipped == 2 and report.labeled == 3
    old = "old tags " if suffix == ".csv" else "old  tags\n"
    labels = {Path(r["path"]).name: r["label"] for r in read_manifest(out)}
    assert labels == {p.name: f"{old}{new[i]}, {new[i]}" for i, p in enumerate(paths)}
    assert not list(tmp_path.glob(".blip2-label-*"))


def test_a_killed_append_run_does_not_mark_images_done_for_another_command(model, tmp_path, monkeypatch):
    paths = cf.write_good(tmp_path, 4)
    for p in paths:
        p.with_suffix(".txt").write_text("old")
    run = dict(generation=GEN, workers=0, progress=False, batch_size=2, mode="append")
    with monkeypatch.context() as m:
        _stop_at_batch(m, 2, "generate")
        with pytest.raises(_Killed):
            label_images(model, paths, **run)
    other = label_images(model, paths[:2], **{**run, "separator": "; "})  # another separator: another run
    assert other.labeled == 2 and other.skipped == 0
    text = paths[0].with_suffix(".txt").read_text()
    assert text.startswith("old ") and "; " in text
