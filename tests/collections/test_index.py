"""The photo index (blip2.collections.index/search/vectors): search equals `Blip2.similarity` / `retrieve` on
the same images, incremental updates equal a clean build, a second model is refused, an interrupted build
resumes to the clean build's state, approximate kinds return k distinct images, CLI outputs (text, JSON, HTML)
and the server payload."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
from PIL import Image

faiss = pytest.importorskip("faiss")

from blip2.collections import vectors as vec  # noqa: E402
from blip2.collections.index import IndexMismatchError, PhotoIndex, update_index  # noqa: E402
from blip2.collections.search import search, search_route_payload  # noqa: E402

TEXT = "a red circle"


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:36, 0:44]
    base = np.stack([xx * 5.0, yy * 6.0, np.full(xx.shape, (seed * 53) % 256)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def write_images(folder: Path, seeds) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in seeds:
        picture(s).save(folder / f"img{s:02d}.png")
        out.append(folder / f"img{s:02d}.png")
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import blip2

    folder = tmp_path_factory.mktemp("retrieval")
    tm.save_retrieval_model(folder)
    return blip2.load(str(folder), device="cpu", batch_size=4)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.resolve()) for p in folder.iterdir() if p.suffix == ".png")


def stored(folder: Path) -> dict[str, np.ndarray]:
    """path -> its stored vectors (Q, E), what two indexes of the same files must agree on."""
    with PhotoIndex.open(folder) as index:
        ids, vecs = vec.all_vectors(index.vectors)
        q = index.num_queries
        paths = index.paths(sorted(set((ids // q).tolist())))
        order = np.argsort(ids)
        ids, vecs = ids[order], vecs[order]
        return {paths[int(i) // q]: vecs[ids // q == i // q] for i in ids[::q]}


def assert_same_index(a: Path, b: Path) -> None:
    sa, sb = stored(a), stored(b)
    assert sorted(sa) == sorted(sb)
    for path in sa:
        np.testing.assert_allclose(sa[path], sb[path], atol=1e-5)


# ------------------------------------------------------------------------------------------- equality


def test_search_equals_similarity_and_retrieve(model, tmp_path):
    paths = [str(p.resolve()) for p in write_images(tmp_path / "photos", range(10))]
    report = update_index(model, tmp_path / "idx", [tmp_path / "photos"], workers=1)
    assert (report.added, report.images, report.structure, report.failed) == (10, 10, "exact", [])

    sim = model.similarity(paths, TEXT)[:, 0]  # (10,)
    expected = [paths[i] for i in sim.argsort(descending=True).tolist()]
    hits = search(model, tmp_path / "idx", text=TEXT, k=10, rerank=False)
    assert [h.path for h in hits] == expected
    np.testing.assert_allclose([h.itc for h in hits], sorted(sim.tolist(), reverse=True), atol=1e-5)
    assert [h.rank for h in hits] == list(range(1, 11)) and all(h.itm is None for h in hits)

    hits = search(model, tmp_path / "idx", text=TEXT, k=4)  # ITM re-ranked, as retrieve
    matches = model.retrieve(TEXT, paths, k=4)[0]
    assert [h.path for h in hits] == [paths[m.index] for m in matches]
    np.testing.assert_allclose([h.score for h in hits], [m.score for m in matches], atol=1e-4)
    np.testing.assert_allclose([h.itm for h in hits], model.itm([h.path for h in hits], TEXT), atol=1e-4)

    hits = search(model, tmp_path / "idx", image=paths[3], k=3)  # by example: the image itself first
    assert hits[0].path == paths[3] and hits[0].score == pytest.approx(1.0, abs=1e-5) and len(hits) == 3


# ------------------------------------------------------------------------------------------- incremental


def test_incremental_add_remove_change_equals_clean_build(model, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, range(6))
    first = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert first.added == 6
    written = (tmp_path / "idx" / "vectors.faiss").stat().st_mtime_ns
    again = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 6)
    assert (tmp_path / "idx" / "vectors.faiss").stat().st_mtime_ns == written  # a no-op writes nothing

    write_images(photos, [20, 21])  # new
    (photos / "img01.png").unlink()  # deleted
    picture(99).save(photos / "img02.png")  # changed content
    st = (photos / "img02.png").stat()
    os.utime(photos / "img02.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    os.utime(photos / "img03.png", ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # touched only
    report = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert (report.added, report.updated, report.removed, report.unchanged, report.images) == (2, 1, 1, 4, 7)

    update_index(model, tmp_path / "clean", [photos], workers=0)
    assert_same_index(tmp_path / "idx", tmp_path / "clean")
    paths = files_of(photos)
    sim = model.similarity(paths, TEXT)[:, 0]
    hits = search(model, tmp_path / "idx", text=TEXT, k=7, rerank=False)
    assert [h.path for h in hits] == [paths[i] for i in sim.argsort(descending=True).tolist()]

    # --prune keeps only this run's inputs
    report = update_index(model, tmp_path / "idx", [photos / "img00.png"], workers=0, prune=True)
    assert (report.removed, report.images) == (6, 1)


def test_bad_images_are_recorded_and_skipped(model, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, range(3))
    (photos / "broken.png").write_text("not an image")
    report = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert report.images == 3 and [Path(p).name for p, _ in report.failed] == ["broken.png"]
    assert "not an image" in report.failed[0][1]
    with PhotoIndex.open(tmp_path / "idx") as index:
        row = index.rows()[str((photos / "broken.png").resolve())]
        assert row.status == "error" and "not an image" in row.error
    again = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert again.failed == [] and again.unchanged == 4  # not retried while unchanged
    assert all("broken" not in h.path for h in search(model, tmp_path / "idx", text=TEXT, k=10, rerank=False))


def test_another_model_is_refused(model, tmp_path):
    import blip2

    write_images(tmp_path / "photos", range(2))
    update_index(model, tmp_path / "idx", [tmp_path / "photos"], workers=0)
    tm.save_retrieval_model(tmp_path / "other", seed=1)
    other = blip2.load(str(tmp_path / "other"), device="cpu")
    with pytest.raises(IndexMismatchError, match="another model"):
        update_index(other, tmp_path / "idx", [tmp_path / "photos"], workers=0)
    with pytest.raises(IndexMismatchError, match="another model"):
        search(other, tmp_path / "idx", text=TEXT)


# ------------------------------------------------------------------------------------------- resume


class Boom(RuntimeError):
    pass


def test_interrupted_build_resumes_to_the_clean_build(model, tmp_path):
    photos = tmp_path / "photos"
    write_images(photos, range(9))
    update_index(model, tmp_path / "clean", [photos], workers=0)

    def stop(done: int) -> None:  # killed after 2 committed batches of 2
        if done >= 4:
            raise Boom

    with pytest.raises(Boom):
        update_index(model, tmp_path / "idx", [photos], workers=0, batch_size=2, commit_every=0, on_batch=stop)
    with PhotoIndex.open(tmp_path / "idx") as index:
        assert len(index) == 4
    report = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert (report.added, report.unchanged) == (5, 4)
    assert_same_index(tmp_path / "idx", tmp_path / "clean")


def test_kill_between_vectors_and_table_is_repaired(model, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    write_images(photos, range(5))
    update_index(model, tmp_path / "clean", [photos], workers=0)
    update_index(model, tmp_path / "idx", [photos / "img00.png", photos / "img01.png"], workers=0)
    picture(77).save(photos / "img01.png")  # a change and three new images, then a kill after the
    st = (photos / "img01.png").stat()      # vectors file is written but before the table commits
    os.utime(photos / "img01.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    update_index(model, tmp_path / "clean2", [photos], workers=0)

    real = vec.write_atomic

    def write_then_die(index, path):
        real(index, path)
        raise Boom

    monkeypatch.setattr(vec, "write_atomic", write_then_die)
    with pytest.raises(Boom):
        update_index(model, tmp_path / "idx", [photos], workers=0)
    monkeypatch.setattr(vec, "write_atomic", real)
    with PhotoIndex.open(tmp_path / "idx") as index:  # the 3 new images' vectors are strays: dropped
        assert index.repaired == 3 and len(index) == 2
    report = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert (report.added, report.updated, report.unchanged) == (3, 1, 1)
    assert_same_index(tmp_path / "idx", tmp_path / "clean2")


# ------------------------------------------------------------------------------------------- approximate


def unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("structure", ["exact", "ivf", "hnsw"])
def test_vector_structures_return_k_distinct_images(structure):
    rng = np.random.default_rng(0)
    n, q, d = 3000, 4, 16
    data = unit(rng, n * q, d).reshape(n, q, d)
    index = vec.new_index(structure, d, train=data.reshape(-1, d))
    vec.add(index, np.arange(n), data)
    query = unit(rng, 1, d)
    truth = (data @ query[0]).max(-1)  # (n,) max over queries
    for k in (1, 10, 200):
        found = vec.search(index, query, k, q)
        assert len(found) == k and len({i for i, _ in found}) == k
        if structure == "exact":
            assert [i for i, _ in found] == np.argsort(-truth, kind="stable")[:k].tolist()
            np.testing.assert_allclose([s for _, s in found], np.sort(truth)[::-1][:k], atol=1e-5)
    index = vec.remove(index, range(0, n, 2), q)  # every even image
    assert index.ntotal == n * q // 2
    assert all(i % 2 == 1 for i, _ in vec.search(index, query, 50, q))
    if structure == "exact":
        ivf = vec.convert(index, "ivf")
        assert sorted(vec.all_ids(ivf).tolist()) == sorted(vec.all_ids(index).tolist())


def test_ivf_widens_until_k_images():
    rng = np.random.default_rng(1)
    n, q, d = 4000, 2, 8
    data = unit(rng, n * q, d).reshape(n, q, d)
    index = vec.new_index("ivf", d, train=data.reshape(-1, d))
    vec.add(index, np.arange(n), data)
    index.nprobe = 1  # one list holds far fewer than k*Q vectors: the search must probe more
    found = vec.search(index, unit(rng, 1, d), 1500, q)
    assert len({i for i, _ in found}) == 1500


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_end_to_end(model, tmp_path, kind):
    photos = tmp_path / "photos"
    write_images(photos, range(8))
    report = update_index(model, tmp_path / "idx", [photos], workers=0, kind=kind)
    assert report.structure == kind
    (photos / "img05.png").unlink()
    report = update_index(model, tmp_path / "idx", [photos], workers=0)
    assert (report.removed, report.images, report.structure) == (1, 7, kind)
    hits = search(model, tmp_path / "idx", text=TEXT, k=5, rerank=False)
    assert len({h.path for h in hits}) == 5
    report = update_index(model, tmp_path / "idx", [photos], workers=0, kind="exact")  # convert back
    assert report.structure == "exact"
    update_index(model, tmp_path / "clean", [photos], workers=0)
    assert_same_index(tmp_path / "idx", tmp_path / "clean")


# ------------------------------------------------------------------------------------------- outputs


def parse(add, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--model", default="tiny")
    add(p)
    return p.parse_args(argv)


def test_commands_text_json_html(model, tmp_path, capsys):
    from blip2.collections.index_command import add_index_arguments, add_search_arguments, run_index, run_search

    photos = tmp_path / "photos"
    write_images(photos, range(4))
    odd = photos / "a&b<c>.png"
    shutil.copy(photos / "img00.png", odd)
    load = lambda: model  # noqa: E731
    assert run_index(parse(add_index_arguments, [str(photos), "--out", str(tmp_path / "idx"), "--workers", "0"]), load) == 0
    assert "5 images (exact); added 5" in capsys.readouterr().out

    args = parse(add_search_arguments, [str(tmp_path / "idx"), TEXT, "-k", "3", "--html", str(tmp_path / "r.html")])
    assert run_search(args, load) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "match", "cosine", "path"] and len(lines) == 4

    args = parse(add_search_arguments, ["--json", str(tmp_path / "idx"), TEXT, "-k", "5", "--no-rerank"])
    run_search(args, load)
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and all(r["itm"] is None for r in rows)
    assert {r["path"] for r in rows} == set(files_of(photos))

    args = parse(add_search_arguments, [str(tmp_path / "idx"), TEXT, "-k", "5", "--html", str(tmp_path / "r.html")])
    run_search(args, load)
    page = (tmp_path / "r.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 5 and "a&amp;b&lt;c&gt;.png" in page
    assert "a&b<c>" not in page and "match" in page

    with pytest.raises(ValueError, match="one of the two"):
        run_search(parse(add_search_arguments, [str(tmp_path / "idx")]), load)
    with pytest.raises(FileNotFoundError, match="not a photo index"):
        run_search(parse(add_search_arguments, [str(tmp_path), TEXT]), load)


def test_search_route_payload(model, tmp_path):
    write_images(tmp_path / "photos", range(4))
    update_index(model, tmp_path / "idx", [tmp_path / "photos"], workers=0)
    with PhotoIndex.open(tmp_path / "idx") as index:
        out = search_route_payload(model, index, {"query": TEXT, "k": 2})
        assert out["object"] == "list" and out["index"] == {"images": 4, "kind": "exact"}
        assert [d["path"] for d in out["data"]] == [h.path for h in search(model, index, text=TEXT, k=2)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:  # the server searches from its model worker thread
            assert pool.submit(search_route_payload, model, index, {"query": TEXT, "k": 2}).result() == out
        by_image = search_route_payload(model, index, {"image": "x"}, load_image=lambda _: picture(2))
        assert by_image["data"][0]["path"].endswith("img02.png")
        for bad in ({}, {"query": TEXT, "image": "x"}, {"query": ""}, {"query": TEXT, "k": 0},
                    {"query": TEXT, "rerank": "yes"}, {"image": "x"}):
            with pytest.raises(ValueError):
                search_route_payload(model, index, bad)
