"""The Ray jobs on a local Ray instance (2 CPUs, fractional actors): labeling equals `label_images`' manifest
and resumes, indexing searches as a single-machine build does, and Ray Serve answers through 2 replicas with
the library's captions. One `ray.init` for the module (~7 s); the whole file takes about a minute on 2 cores."""

from __future__ import annotations

import base64
import io
import json
import socket
from pathlib import Path

import pytest

import collection_files as cf
import tiny_models as tm

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'blip2[ray]')")
pytest.importorskip("faiss")

pytestmark = pytest.mark.slow

GEN = {"max_new_tokens": 6}  # caption defaults otherwise (5 beams): labels differ between images
GREEDY = {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 0}
ACTORS = {"num_actors": 2, "cpus_per_actor": 0.5, "num_gpus_per_actor": 0}  # 2 CPUs: the read stage keeps one


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray") / "opt"
    tm.save_generation_model(folder, "opt", seed=2)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("ray") / "imgs"
    cf.write_good(folder, 18)
    cf.write_bad(folder)
    return sorted(folder.iterdir())


def _by_path(rows: list[dict]) -> dict[str, dict]:
    return {r["path"]: r for r in rows}


def test_labels_equal_the_single_machine_run_and_resume(cluster, caption_model, images, tmp_path, one_thread):
    import blip2
    from blip2.collections import label_images, read_manifest
    from blip2.collections.ray_jobs import label_with_ray

    local = label_images(blip2.load(str(caption_model), device="cpu"), images, out=tmp_path / "local.jsonl",
                         generation=GEN, batch_size=4, workers=0, model_name="tiny", progress=False)
    assert local.labeled == 18 and local.failed == len(cf.BAD_KINDS)
    want = _by_path(read_manifest(tmp_path / "local.jsonl"))

    out = tmp_path / "ray.jsonl"
    kw = {"out": out, "generation": GEN, "batch_size": 4, "load_kwargs": {"device": "cpu"}, "model_name": "tiny",
          "progress": False, **ACTORS}
    report = label_with_ray(str(caption_model), images, **kw)
    assert (report.labeled, report.failed, report.skipped) == (18, len(cf.BAD_KINDS), 0)
    assert _by_path(read_manifest(out)) == want  # labels, statuses, errors, settings: every field

    again = label_with_ray(str(caption_model), images, **kw)  # nothing left to do: Ray is not even asked
    assert (again.labeled, again.failed, again.skipped) == (0, 0, len(images))

    # A run killed after 9 rows, in the middle of writing the 10th: the rest is labeled, the result the same.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:9]) + lines[9][:20])
    resumed = label_with_ray(str(caption_model), images, **{**kw, "out": out})
    assert resumed.skipped == 9 and resumed.labeled + resumed.failed == len(images) - 9
    assert _by_path(read_manifest(out)) == want

    # parquet goes through its journal and is written atomically at the end, as label_images does it
    pq = label_with_ray(str(caption_model), images, **{**kw, "out": tmp_path / "ray.parquet"})
    assert pq.labeled == 18
    assert _by_path(read_manifest(tmp_path / "ray.parquet")) == want


class _Killed(BaseException):
    """Stands in for a kill: not an Exception, so nothing on the way catches it."""


def test_a_killed_append_run_reruns_without_doubling_labels(cluster, caption_model, images, tmp_path, monkeypatch,
                                                            one_thread):
    from blip2.collections import read_manifest, writers
    from blip2.collections.ray_jobs import label_with_ray

    out = tmp_path / "ray.jsonl"
    kw = {"out": out, "generation": GEN, "batch_size": 4, "load_kwargs": {"device": "cpu"}, "model_name": "tiny",
          "progress": False, **ACTORS}
    label_with_ray(str(caption_model), images, **kw)
    first = {r["path"]: r["label"] for r in read_manifest(out) if r["status"] == "ok"}
    real_write, calls = writers.ManifestWriter.write, {"n": 0}

    def write(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch of appended labels is stored, the run dies before the second
            raise _Killed
        return real_write(self, rows)

    run = {**kw, "mode": "append", "separator": ", "}
    with monkeypatch.context() as m:
        m.setattr(writers.ManifestWriter, "write", write)
        with pytest.raises(_Killed):
            label_with_ray(str(caption_model), images, **run)
    assert len(list(tmp_path.glob(".blip2-label-append-*.journal.jsonl"))) == 1
    report = label_with_ray(str(caption_model), images, **run)
    assert report.skipped > 0  # the killed run's first batch
    # The same model and settings caption each image as before: every label holds it exactly twice.
    assert {r["path"]: r["label"] for r in read_manifest(out) if r["status"] == "ok"} == {
        p: f"{label}, {label}" for p, label in first.items()}
    assert not list(tmp_path.glob(".blip2-label-*"))  # a finished run leaves no journal


def test_index_searches_as_the_single_machine_build(cluster, images, tmp_path_factory, tmp_path, one_thread):
    import blip2
    from blip2.collections.index import PhotoIndex, update_index
    from blip2.collections.ray_jobs import index_with_ray
    from blip2.collections.search import search

    folder = tmp_path_factory.mktemp("retrieval")
    tm.save_retrieval_model(folder)
    model = blip2.load(str(folder), device="cpu", batch_size=4)
    local = update_index(model, tmp_path / "local", images, workers=0, progress=False)
    report = index_with_ray(model, str(folder), tmp_path / "ray", images, batch_size=4,
                            load_kwargs={"device": "cpu"}, progress=False, **ACTORS)
    assert (report.added, len(report.failed)) == (local.added, len(local.failed)) == (18, len(cf.BAD_KINDS))
    for text in ("a red circle", "a photo of a dog"):
        with PhotoIndex.open(tmp_path / "local") as a, PhotoIndex.open(tmp_path / "ray") as b:
            want, got = search(model, a, text=text, k=10), search(model, b, text=text, k=10)
        assert [h.path for h in got] == [h.path for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    again = index_with_ray(model, str(folder), tmp_path / "ray", images, load_kwargs={"device": "cpu"},
                           progress=False, **ACTORS)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 18 + len(cf.BAD_KINDS))


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def test_cli_index_engine_ray(cluster, images, tmp_path_factory, tmp_path):
    """`blip2 index --engine ray` in its own process, on this module's cluster (--ray-address), equals the
    library's single-machine build."""
    import os
    import subprocess
    import sys

    import blip2
    from blip2.collections.index import PhotoIndex, update_index

    folder = tmp_path_factory.mktemp("retrieval-cli")
    tm.save_retrieval_model(folder)
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "blip2.cli", "index", *map(str, images), "--out", str(tmp_path / "ray"),
         "--model", str(folder), "--device", "cpu", "--batch-size", "4", "--json", "--engine", "ray",
         "--ray-address", address, "--ray-actors", "1", "--ray-cpus-per-actor", "0.5"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["added"] == 18
    update_index(blip2.load(str(folder), device="cpu"), tmp_path / "local", images, workers=0, progress=False)
    with PhotoIndex.open(tmp_path / "local") as a, PhotoIndex.open(tmp_path / "ray") as b:
        assert sorted(a.rows()) == sorted(b.rows())
        assert a.vectors.ntotal == b.vectors.ntotal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_through_two_replicas(cluster, caption_model):
    import httpx
    from ray import serve

    import blip2
    from blip2.serve.app import ServerConfig
    from blip2.serve.ray_serve import REPLICA_HEADER, build_app

    tm_images = tm.images(4, seed=3)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(str(caption_model), ServerConfig(model_name="tiny"), num_replicas=2,
                            cpus_per_replica=0.25, load_kwargs={"device": "cpu"}), name="blip2", route_prefix="/")
        library = blip2.load(str(caption_model), device="cpu")
        replicas = set()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/health").status_code == 200
            for i in range(8):
                image = tm_images[i % len(tm_images)]
                r = c.post("/v1/caption", json={"image": data_url(image), **GREEDY})
                assert r.status_code == 200, r.text
                assert r.json()["caption"] == library.caption(image, **GREEDY)[0]
                replicas.add(r.headers[REPLICA_HEADER])
        assert len(replicas) == 2, replicas
    finally:
        serve.shutdown()
