"""`blip2 label` options and run (through the CLI's shared model/generation parents), and resume after kill -9:
a run killed in the middle, then run again, leaves exactly what an uninterrupted run leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import collection_files as cf
import label_script
import tiny_models as tm
from blip2.collections import read_manifest
from blip2.collections.writers import TEMP_SUFFIX

HERE = Path(__file__).resolve().parent
GEN = ["--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("label-cmd") / "opt"
    tm.save_generation_model(folder, "opt", seed=2)
    return folder


@pytest.fixture(scope="module")
def model(model_dir: Path):
    import blip2

    return blip2.load(str(model_dir), device="cpu", batch_size=4)


def _run(model, argv: list[str], capsys) -> tuple[int, str]:
    from blip2.collections import label_command

    args = label_script.parser().parse_args(argv)
    code = label_command.run(args, lambda: model)
    return code, capsys.readouterr().out


def test_help_imports_no_torch():
    code = ("import sys, argparse; from blip2.collections import label_command; "
            "label_command.add_arguments(argparse.ArgumentParser()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_command_labels_reports_and_resumes(model, tmp_path: Path, capsys, one_thread):
    cf.write_good(tmp_path / "a", 3)
    cf.write_good(tmp_path / "a" / "deep", 2, start=3, fmt="jpg")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    out = tmp_path / "labels.csv"
    code, text = _run(model, [str(tmp_path / "a"), "-r", "--out", str(out), "--json", *GEN], capsys)
    report = json.loads(text)
    assert code == 0 and (report["labeled"], report["failed"], report["total"]) == (5, 1, 6)
    assert report["failures"] == [{"path": str(tmp_path / "a" / "empty.png"), "error": "empty file"}]
    rows = read_manifest(out)
    assert len(rows) == 6 and rows[0]["generation"]["max_new_tokens"] == 6
    code, text = _run(model, [str(tmp_path / "a"), "-r", "--out", str(out), *GEN], capsys)
    assert text.startswith("0 labeled, 6 skipped (already done), 0 failed, 6 in all")
    # --extensions, --files-from, --question, --ext, --append with its separator and a prefix
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'a' / 'img000.png'}\n")
    _run(model, ["--files-from", str(listing), "-q", "what color is it ?", "--ext", "caption", *GEN], capsys)
    answer = (tmp_path / "a" / "img000.caption").read_text()
    assert answer == model.ask(tmp_path / "a" / "img000.png", "what color is it ?", max_new_tokens=6)[0]
    _run(model, [str(tmp_path / "a" / "deep"), "--extensions", "JPG", "--ext", ".caption", "--append",
                 "--separator", ", ", "--prefix", "x ", *GEN], capsys)
    assert not (tmp_path / "a" / "deep" / "img003.caption").read_text().startswith(",")


@pytest.mark.parametrize("argv, message", [
    ([], "give folders"),
    (["{tmp}/missing"], "does not exist"),
    (["{tmp}", "--out", "{tmp}/labels.txt"], "manifest"),
    (["{tmp}", "--ext", ".png"], "--ext"),
    (["{tmp}", "--template", "Q: {} A:"], "--template"),
    (["{tmp}", "--num-beams", "0"], None),
])
def test_mistakes_fail_before_the_model_loads(tmp_path: Path, argv, message, capsys):
    from blip2.collections import label_command

    cf.write_good(tmp_path, 1)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if message is None:  # argparse refuses it
        with pytest.raises(SystemExit):
            label_script.parser().parse_args(argv)
        return
    args = label_script.parser().parse_args(argv)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        label_command.run(args, lambda: pytest.fail("the model must not load"))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _outputs(folder: Path, out: Path | None) -> object:
    if out is None:
        return {p.name: p.read_text() for p in sorted(folder.glob("*.txt"))}
    return [{**row, "path": Path(row["path"]).name} for row in map(json.loads, out.read_text().splitlines())]


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_kill_9_then_resume_equals_an_uninterrupted_run(model, model_dir: Path, tmp_path: Path, capsys):
    """Both outputs at once (sidecars, a JSONL manifest): two processes, each killed once 8 images are written."""
    runs = {}
    for kind in ("sidecars", "jsonl"):
        for name in ("killed", "whole"):
            cf.write_good(tmp_path / kind / name, 36)
            cf.write_bad(tmp_path / kind / name)
        runs[kind] = {name: tmp_path / kind / name for name in ("killed", "whole")}

    def out(kind: str, name: str) -> Path | None:
        return tmp_path / kind / f"{name}.jsonl" if kind == "jsonl" else None

    def argv(kind: str, name: str) -> list[str]:
        extra = ["--out", str(out(kind, name))] if kind == "jsonl" else []
        return [str(runs[kind][name]), "--model", str(model_dir), "--batch-size", "4", "--workers", "2", *GEN,
                "--num-beams", "1", *extra]  # greedy: the point here is the kill, not the search

    def progress(kind: str) -> int:
        if kind == "jsonl":
            path = out(kind, "killed")
            return path.read_bytes().count(b"\n") if path.exists() else 0
        return len(list(runs[kind]["killed"].glob("*.txt")))

    env = {**os.environ, "BLIP2_TEST_BATCH_DELAY": "0.4", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    procs = {kind: subprocess.Popen([sys.executable, str(HERE / "label_script.py"), *argv(kind, "killed")], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for kind in runs}
    workers: list[int] = []
    deadline = time.monotonic() + 300
    while procs and time.monotonic() < deadline:
        for kind, proc in list(procs.items()):
            ended = proc.poll() is not None
            assert not ended, f"{kind}: the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            if progress(kind) >= 8:
                workers += _children(proc.pid)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                proc.stderr.close()
                assert 8 <= progress(kind) < 41
                del procs[kind]
        time.sleep(0.02)
    assert not procs, "no progress within the time limit"
    assert len(workers) >= 4  # two decoding workers per run
    end = time.monotonic() + 10  # the decoding workers notice their parent is gone and exit
    while any(_alive(pid) for pid in workers) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)]

    for kind in runs:
        _run(model, argv(kind, "killed"), capsys)  # the rerun, in process
        _run(model, argv(kind, "whole"), capsys)  # a run never interrupted
        killed, whole = _outputs(runs[kind]["killed"], out(kind, "killed")), _outputs(runs[kind]["whole"], out(kind, "whole"))
        assert killed == whole and len(killed) == (41 if kind == "jsonl" else 36)
    assert out("jsonl", "killed").read_bytes().endswith(b"\n")
    assert not list(tmp_path.rglob(f"*{TEMP_SUFFIX}"))
