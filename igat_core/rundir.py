"""The run directory: every file name in it, its atomic writes, its appends, and the reading side.

One directory per run: `igat run --out DIR`, or `IGAT_ARTIFACT_ROOT/<experiment id>` (`run_dir_of`) for the
service. The runner writes it; the dispatcher and the API read it; docs/architecture.md lists who writes and reads
each file. This module imports no torch, so the service uses it too.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

SPEC_FILE = "spec.yaml"
STATE_FILE = "state.json"
EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.jsonl"
TUNE_FILE = "tune.json"
EVALUATION_FILE = "evaluation.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
EVAL_STATE_DIR = "eval_state"
CHECKPOINTS_DIR = "checkpoints"
ENSEMBLE_FILE = "ensemble.pt"
LAST_CHECKPOINT = "last.pt"
SCORE_FILE = "score.json"
HANDLE_FILE = "executor.json"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
JOB_LOG = "job.log"
STUDY_FILE = "study.json"
STUDY_RUNS_DIR = "runs"


def run_dir_of(artifact_root: str | Path, experiment_id: str) -> Path:
    """The run directory the service gives an experiment that has not recorded one."""
    return Path(artifact_root) / experiment_id


def study_run_dir(study_dir: Path, experiment: str) -> Path:
    """The run directory of one planned experiment of the study in `study_dir` (`igat study --out DIR`)."""
    return study_dir / STUDY_RUNS_DIR / experiment


def checkpoint_dir(run_dir: Path, name: str) -> Path:
    """Where the phase `name` (base, igat, a control, tune/<trial>) keeps its checkpoints."""
    return run_dir / CHECKPOINTS_DIR / name


#: The model name of the transfer attack's source that a run trains (`eval.transfer_from: standard`).
TRANSFER_SOURCE = "transfer_source"


def model_checkpoint(model: str) -> str:
    """The saved ensemble of `model` (base, igat, a control or TRANSFER_SOURCE), relative to the run directory."""
    return f"{CHECKPOINTS_DIR}/{model}/{ENSEMBLE_FILE}"


# ------------------------------------------------------------------------------------------------------ writing


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; it replaces `path` only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True)
class RunLog:
    """Appends progress events and per-epoch metrics to the run directory (the service ingests both), and hands
    each event's record to `listener` too (`igat run` draws its progress bars from them)."""

    out: Path
    listener: Callable[[dict], None] | None = field(default=None, compare=False, repr=False)

    def event(self, phase: str, event: str, message: str = "", **data: object) -> None:
        record = {"time": datetime.now(UTC).isoformat(), "phase": phase, "event": event,
                  "message": message, **data}
        with open(self.out / EVENTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.listener is not None:
            self.listener(record)

    def silent_for(self, tail_bytes: int = 65_536) -> float:
        """Seconds since the newest event any process appended, Ray's own log lines (kind `log`) left out;
        infinite when the last `tail_bytes` of events.jsonl hold none."""
        try:
            with open(self.out / EVENTS_FILE, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
                lines = f.read().splitlines()
        except FileNotFoundError:
            return math.inf
        for line in reversed(lines):
            when = _event_time(line)
            if when is not None:
                return time.time() - when
        return math.inf

    def metrics(self, metrics: dict) -> None:
        """A line of metrics.jsonl and its `epoch` event (with `examples_per_s` when the metrics have it)."""
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and k not in ("seconds", "examples_per_s"))
        rate = metrics.get("examples_per_s")
        speed = {} if rate is None else {"examples_per_s": rate}
        self.event(metrics["phase"], "epoch", f"epoch {metrics['epoch']}: {shown}"
                   + ("" if rate is None else f" ({rate:.0f} examples/s)"), epoch=metrics["epoch"], **speed)

    def drop_metrics_after(self, phase: str, epoch: int) -> None:
        """Forget metrics of epochs that the resumed phase will redo, so each epoch appears once."""
        path = self.out / METRICS_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip()
                and not (json.loads(line)["phase"] == phase and json.loads(line)["epoch"] > epoch)]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------------------------------------------ reading


def _event_time(line: bytes) -> float | None:
    """The POSIX time of an events.jsonl line, None for a log line or one that is not (yet) a whole event."""
    try:
        record = json.loads(line)
        return None if record.get("event") == "log" else datetime.fromisoformat(record["time"]).timestamp()
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def read_json(path: Path) -> Any | None:
    """The parsed JSON file, or None when it is missing or not (yet) readable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_results(run_dir: Path) -> dict | None:
    """results.json, or None: a run has succeeded exactly when this is a dict."""
    results = read_json(run_dir / RESULTS_FILE)
    return results if isinstance(results, dict) else None


def artifact_files(run_dir: Path) -> list[tuple[str, int]]:
    """(path relative to the run directory, size) of every regular file under it, symlinks left out."""
    root = run_dir.resolve()
    if not root.is_dir():
        return []
    return [(p.relative_to(root).as_posix(), p.stat().st_size) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()]


class Lines(NamedTuple):
    """Complete lines read from a byte offset, the offset just after them, and whether bytes may follow them
    (`max_lines` lines were taken, or the read ended inside a line or at `max_bytes`)."""

    lines: list[bytes]
    offset: int
    more: bool


def complete_lines(path: Path, offset: int, max_bytes: int, max_lines: int) -> Lines | None:
    """The complete lines of `path` in the `max_bytes` after byte `offset` (at most `max_lines` of them).

    None when the file is shorter than `offset` (it was replaced: the caller re-syncs); no lines when it is
    missing or has no new complete line."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) < offset:
                return None
            f.seek(offset)
            chunk = f.read(max_bytes)
    except FileNotFoundError:
        return Lines([], offset, False)
    end = chunk.rfind(b"\n")
    if end < 0:
        return Lines([], offset, False)
    lines = chunk[: end + 1].splitlines()[:max_lines]
    more = len(lines) == max_lines or end + 1 < len(chunk)
    return Lines(lines, offset + sum(len(line) + 1 for line in lines), more)


def offset_after_lines(path: Path, n: int) -> int | None:
    """The byte offset just after the first `n` complete lines of `path`; None when it holds fewer."""
    offset = 0
    try:
        with open(path, "rb") as f:
            for _ in range(n):
                line = f.readline()
                if not line.endswith(b"\n"):
                    return None
                offset += len(line)
    except FileNotFoundError:
        return None if n else 0
    return offset


def metric_rows(path: Path) -> dict[tuple[str, int], dict[str, Any]] | None:
    """metrics.jsonl as {(phase, epoch): values}, or None when it is missing.

    Complete lines only; the last line of an epoch wins, malformed lines are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for line in data.split(b"\n")[:-1]:
        parsed = _metric_row(line)
        if parsed is not None:
            rows[parsed[0], parsed[1]] = parsed[2]
    return rows


def _metric_row(line: bytes) -> tuple[str, int, dict[str, Any]] | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        return None
    if not isinstance(record, dict):
        return None
    phase, epoch = record.pop("phase", None), record.pop("epoch", None)
    if not isinstance(phase, str) or not phase or len(phase) > 32:
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        return None
    return phase, epoch, record
