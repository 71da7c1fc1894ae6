"""data/durable.py: the one fsync helper pair that label writers and training checkpoints share."""

from __future__ import annotations

import os

from blip2.collections import writers
from blip2.data import durable
from blip2.training import checkpoint


def test_file_and_folder_are_synced_and_an_unopenable_folder_is_a_no_op(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    (tmp_path / "a.bin").write_bytes(b"abc")
    durable.fsync_file(tmp_path / "a.bin")
    durable.fsync_dir(tmp_path)
    assert synced == [str(tmp_path / "a.bin"), str(tmp_path)]
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    durable.fsync_dir(tmp_path / "missing")  # cannot be opened: nothing to make durable, no error
    assert len(synced) == 2


def test_writers_and_checkpoints_use_the_shared_helpers():
    assert writers.fsync_dir is durable.fsync_dir
    assert checkpoint.fsync_dir is durable.fsync_dir and checkpoint.fsync_file is durable.fsync_file
