"""The longest silence of each phase of a run, from its events.jsonl.

    .venv/bin/python scripts/event_gaps.py RUN_DIR [--max-gap 15]

A phase's silence is the longest time between consecutive events of the run (any phase's) from the phase's first
event to its last; a tune trial's phase (`tune/<trial>`) counts as `tune`, Ray's own log lines (kind `log`) are
left out, and so is the `run` phase (it spans the others). The last row is the whole run. Exits 1 when a silence is
longer than --max-gap seconds (issue 17: no phase of `make demo` silent for more than 15 s).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igat_core.rundir import EVENTS_FILE  # noqa: E402

RUN = "run"


@dataclass(frozen=True)
class Silence:
    phase: str
    events: int
    seconds: float
    longest: float
    after: str


def timed_events(lines: list[str]) -> list[tuple[float, str, str]]:
    """(POSIX time, phase group, 'phase kind: message' of the event) of each event but Ray's log lines."""
    found = []
    for line in lines:
        record = json.loads(line)
        if record.get("event") == "log":
            continue
        phase = str(record.get("phase") or "")
        when = datetime.fromisoformat(record["time"]).timestamp()
        found.append((when, phase.split("/")[0], f"{phase} {record.get('event')}: {record.get('message', '')}"))
    return found


def silences(lines: list[str]) -> list[Silence]:
    """Per phase group (in order of appearance, `run` left out) and then for the whole run (named `all`)."""
    events = timed_events(lines)
    phases = list(dict.fromkeys(p for _, p, _ in events if p != RUN))
    spans = [(p, [i for i, e in enumerate(events) if e[1] == p]) for p in phases]
    spans.append(("all", list(range(len(events)))))
    found = []
    for phase, members in spans:
        window = events[members[0]:members[-1] + 1] if members else []
        gaps = [(b[0] - a[0], a[2]) for a, b in zip(window, window[1:])] or [(0.0, "")]
        longest, after = max(gaps)
        found.append(Silence(phase, len(members), window[-1][0] - window[0][0] if window else 0.0, longest, after))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help=f"a run directory (or its {EVENTS_FILE})")
    parser.add_argument("--max-gap", type=float, default=15.0, help="longest silence allowed, seconds")
    args = parser.parse_args(argv)
    path = args.run_dir / EVENTS_FILE if args.run_dir.is_dir() else args.run_dir
    found = silences([line for line in path.read_text().splitlines() if line.strip()])
    print("| phase | events | span (s) | longest silence (s) | after the event |\n|---|---:|---:|---:|---|")
    for s in found:
        print(f"| {s.phase} | {s.events} | {s.seconds:.1f} | {s.longest:.1f} | {s.after[:90]} |")
    over = [s.phase for s in found if s.longest > args.max_gap]
    if over:
        print(f"silent for more than {args.max_gap:g} s: {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
