"""The run directory's reading side and atomic writes (`igat_core.rundir`), and the liveness check of
`workers.executors.processes`, on real files and real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from igat_core import rundir
from workers.executors.processes import alive, group_members, start_time, stat_fields

HALF = b'{"event": "epo'


def test_complete_lines_leaves_a_half_written_line_until_it_is_complete(tmp_path: Path) -> None:
    path = tmp_path / rundir.EVENTS_FILE
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n' + HALF)

    read = rundir.complete_lines(path, 0, 1 << 20, 100)
    assert read is not None
    assert read.lines == [b'{"a": 1}', b'{"b": 2}']
    assert read.offset == len(b'{"a": 1}\n{"b": 2}\n')

    assert rundir.complete_lines(path, read.offset, 1 << 20, 100).lines == []

    with open(path, "ab") as f:
        f.write(b'ch"}\n')
    after = rundir.complete_lines(path, read.offset, 1 << 20, 100)
    assert after.lines == [HALF + b'ch"}']
    assert after.offset == path.stat().st_size


def test_complete_lines_caps_the_lines_and_says_more_may_follow(tmp_path: Path) -> None:
    path = tmp_path / rundir.EVENTS_FILE
    path.write_bytes(b"1\n22\n333\n")

    first = rundir.complete_lines(path, 0, 1 << 20, 2)
    assert (first.lines, first.offset, first.more) == ([b"1", b"22"], 5, True)
    rest = rundir.complete_lines(path, first.offset, 1 << 20, 2)
    assert (rest.lines, rest.offset, rest.more) == ([b"333"], 9, False)


def test_complete_lines_is_none_when_the_file_shrank_below_the_offset(tmp_path: Path) -> None:
    path = tmp_path / rundir.EVENTS_FILE
    path.write_bytes(b"one\ntwo\n")
    path.write_bytes(b"one\n")
    assert rundir.complete_lines(path, 8, 1 << 20, 100) is None
    assert rundir.complete_lines(tmp_path / "missing.jsonl", 0, 1 << 20, 100).lines == []


def test_offset_after_lines(tmp_path: Path) -> None:
    path = tmp_path / rundir.EVENTS_FILE
    path.write_bytes(b"one\ntwo\n" + HALF)
    assert rundir.offset_after_lines(path, 0) == 0
    assert rundir.offset_after_lines(path, 2) == 8
    assert rundir.offset_after_lines(path, 3) is None  # the third line is not complete yet
    assert rundir.offset_after_lines(path, 5) is None
    assert rundir.offset_after_lines(tmp_path / "missing.jsonl", 1) is None


def test_metric_rows_skip_malformed_lines_and_keep_the_last_value_of_an_epoch(tmp_path: Path) -> None:
    path = tmp_path / rundir.METRICS_FILE
    lines = [
        json.dumps({"phase": "base", "epoch": 1, "loss": 2.0}),
        "not json",
        json.dumps([1, 2]),
        json.dumps({"phase": "", "epoch": 3, "loss": 9.0}),
        json.dumps({"epoch": 4, "loss": 9.0}),
        json.dumps({"phase": "base", "epoch": 1, "loss": 1.5}),
        json.dumps({"phase": "base", "epoch": True, "loss": 9.0}),
        json.dumps({"phase": "x" * 33, "epoch": 1, "loss": 9.0}),
        json.dumps({"phase": "igat", "epoch": 1, "loss": 0.5}),
    ]
    path.write_text("\n".join(lines) + "\n" + '{"phase": "igat", "epoch": 2')
    assert rundir.metric_rows(path) == {("base", 1): {"loss": 1.5}, ("igat", 1): {"loss": 0.5}}
    assert rundir.metric_rows(tmp_path / "missing.jsonl") is None


def test_replacing_keeps_the_old_file_when_the_block_raises(tmp_path: Path) -> None:
    path = tmp_path / rundir.RESULTS_FILE
    path.write_text("old")
    with pytest.raises(RuntimeError), rundir.replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.RESULTS_FILE]

    rundir.write_json_atomic(path, {"ok": True})
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.RESULTS_FILE]


def test_artifact_files_lists_regular_files_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "plots").mkdir(parents=True)
    (run_dir / "empty").mkdir()
    (run_dir / rundir.RESULTS_FILE).write_text("{}")
    (run_dir / "plots" / "curve.png").write_bytes(b"png!")
    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    (run_dir / "link.txt").symlink_to(outside)
    (run_dir / "linked_dir").symlink_to(tmp_path / "run" / "plots", target_is_directory=True)

    assert rundir.artifact_files(run_dir) == [("plots/curve.png", 4), (rundir.RESULTS_FILE, 2)]
    assert rundir.artifact_files(tmp_path / "missing") == []


def wait_until_zombie(pid: int) -> None:
    """Until the exited, not yet reaped child ``pid`` shows state Z."""
    deadline = time.monotonic() + 30
    while (stat_fields(pid) or ["?"])[0] != "Z":
        assert time.monotonic() < deadline, f"process {pid} never became a zombie"
        time.sleep(0.02)


def test_alive_is_false_for_a_zombie_and_for_a_reaped_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until_zombie(child.pid)
        assert not alive(child.pid)
    finally:
        child.wait()
    assert not alive(child.pid)


def test_alive_is_true_for_this_process_and_checks_its_start_time() -> None:
    me = os.getpid()
    assert alive(me)
    started = start_time(me)
    assert started is not None
    assert alive(me, started)
    assert not alive(me, started + 1)


def test_group_members_are_the_live_processes_of_a_session() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert group_members(child.pid) == [child.pid]
        child.kill()
        wait_until_zombie(child.pid)
        assert group_members(child.pid) == []
    finally:
        child.kill()
        child.wait()
