"""REPRODUCTION.md's generated sections, from the committed study results (results/studies/NAME/).

`--collect NAME DIR` copies what `igat study SPEC --out DIR` wrote, without checkpoints, into results/studies/NAME/:
study.json (the study and its plan), results.json and report.md (the study's), and runs/RUN/results.json (each
run's), from which `study_record_of` rebuilds the study's results.json. Each study gets one block between its
markers: the study report's tables (`igat_core.study_report`, the same cells
as the study's report.md, headings one level down, no plots) and the paper's numbers beside ours for direction.
The prose around the blocks is written by hand; this script only replaces what lies between the markers.

    .venv/bin/python scripts/reproduction.py --collect ablation runs/ablation
    .venv/bin/python scripts/reproduction.py           # rewrite the blocks of REPRODUCTION.md
    .venv/bin/python scripts/reproduction.py --check   # exit 1 if a block differs from its results file
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from igat_core.rundir import REPORT_FILE, RESULTS_FILE, STUDY_FILE, read_json, study_run_dir
from igat_core.study_report import table1_section, table2_section, table3_section
from igat_core.study_results import NOT_RUN, RunOutcome, study_record
from igat_core.study_spec import parse_study, plan_study

ROOT = Path(__file__).resolve().parents[1]
REPRODUCTION = ROOT / "REPRODUCTION.md"
STUDIES = ROOT / "results" / "studies"

#: The paper's Table 3 (iGAT_ADP, CIFAR-10, average combiner, five runs): natural and PGD accuracy (%) per arm.
PAPER_TABLE3 = {"opposite": (82.45, 41.31), "random": (83.05, 42.60), "hard": (83.51, 44.21),
                "beta0": (83.45, 42.32), "igat": (84.96, 46.25)}
#: The paper's Table 2 (CIFAR-10): relative improvement (%) by iGAT, (average natural, average PGD, max natural,
#: max PGD).
PAPER_TABLE2 = {"adp": (3.43, 16.75, 0.80, 7.51), "dverge": (0.42, 2.75, 0.45, 2.21),
                "soe": (-1.39, 5.29, -1.42, -1.63), "cldl": (1.07, 0.29, 0.05, 3.81)}


def collect(name: str, study_dir: Path) -> Path:
    """Copy a finished `igat study --out study_dir` (no checkpoints) to results/studies/NAME/."""
    target = STUDIES / name
    record = read_json(study_dir / STUDY_FILE)
    if record is None or read_json(study_dir / RESULTS_FILE) is None:
        raise SystemExit(f"{study_dir} holds no finished study ({STUDY_FILE} and {RESULTS_FILE})")
    target.mkdir(parents=True, exist_ok=True)
    for file in (STUDY_FILE, RESULTS_FILE, REPORT_FILE):
        shutil.copyfile(study_dir / file, target / file)
    for planned in record["experiments"]:
        source, run_dir = (study_run_dir(d, planned["name"]) for d in (study_dir, target))
        if (source / RESULTS_FILE).is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / RESULTS_FILE, run_dir / RESULTS_FILE)
    return target


def study_record_of(study_dir: Path) -> dict:
    """The study's results.json rebuilt from its study.json and its runs' results.json; a run without results
    keeps the status and error the committed record gives it."""
    study = parse_study(read_json(study_dir / STUDY_FILE)["study"])
    plan = plan_study(study)
    committed = {r["name"]: r for r in (read_json(study_dir / RESULTS_FILE) or {}).get("runs", [])}
    outcomes = {}
    for planned in plan:
        results = read_json(study_run_dir(study_dir, planned.name) / RESULTS_FILE)
        row = committed.get(planned.name)
        outcomes[planned.name] = (RunOutcome.of_results(results) if results is not None else
                                  RunOutcome.failure(row["error"], row["status"]) if row else NOT_RUN)
    return json.loads(json.dumps(study_record(study, plan, outcomes)))


def begin_marker(name: str) -> str:
    return f"<!-- generated from results/studies/{name}/results.json by scripts/reproduction.py; do not edit -->"


def end_marker(name: str) -> str:
    return f"<!-- end of the generated {name} block -->"


def demoted(lines: list[str]) -> list[str]:
    """Headings one level down; the plot links (not committed) left out."""
    kept = [("#" + line if line.startswith("#") else line) for line in lines if not line.startswith("![")]
    return [line for i, line in enumerate(kept) if line or i == 0 or kept[i - 1]]


def _row(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _mean(row: dict | None, signed: bool = False) -> str:
    if row is None or row.get("mean") is None:
        return "n/a"
    return f"{row['mean']:+.2f}" if signed else f"{row['mean']:.2f}"


def paper_table3(record: dict) -> list[str]:
    rows = record["table3"]
    lines = ["#### Beside the paper's Table 3 (CIFAR-10, ResNet-20 members, five runs; for direction only)", "",
             "| arm | natural: here | natural: paper | PGD: here | PGD: paper |", "|---|---:|---:|---:|---:|"]
    for arm, (natural, pgd) in PAPER_TABLE3.items():
        ours = {a: _row(rows, arm=arm, combiner="average", attack=a) for a in ("natural", "pgd")}
        if ours["natural"] is not None:
            lines.append(f"| {arm} | {_mean(ours['natural'])} | {natural:.2f} | {_mean(ours['pgd'])} | {pgd:.2f} |")
    return [*lines, ""]


def paper_table2(record: dict) -> list[str]:
    rows = record["table2"]["relative_improvement"]
    lines = ["#### Beside the paper's Table 2 (CIFAR-10 relative improvement, %; for direction only)", "",
             "| method | average natural: here / paper | average PGD: here / paper | max natural: here / paper | "
             "max PGD: here / paper |", "|---|---:|---:|---:|---:|"]
    cells = [(combiner, attack) for combiner in ("average", "max") for attack in ("natural", "pgd")]
    for method, paper in PAPER_TABLE2.items():
        ours = [_row(rows, method=method, combiner=c, attack=a) for c, a in cells]
        if any(o is not None for o in ours):
            cells_text = " | ".join(f"{_mean(o, True)} / {p:+.2f}" for o, p in zip(ours, paper))
            lines.append(f"| {method} | {cells_text} |")
    return [*lines, ""] if len(lines) > 4 else []


def study_block(name: str, record: dict) -> str:
    counts = record["counts"]
    lines = [f"{counts['planned']} runs planned: {counts['succeeded']} succeeded, {counts['failed']} failed, "
             f"{counts['pending']} pending (results/studies/{name}/).", ""]
    if record.get("table1"):
        lines += demoted(table1_section(record["table1"]))
    if record.get("table2") and record["table2"]["relative_improvement"]:
        lines += demoted(table2_section(record["table2"])) + paper_table2(record)
    if record.get("table3"):
        lines += demoted(table3_section(record["table3"], record["reference_arm"])) + paper_table3(record)
    return "\n".join(lines).rstrip("\n")


def block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(begin_marker(name)) + r"\n(?:.*?\n)?" + re.escape(end_marker(name)), re.DOTALL)


def refreshed(text: str, name: str, record: dict) -> str:
    """``text`` with the block of study ``name`` rebuilt from ``record``; a missing block is an error."""
    pattern = block_pattern(name)
    if not pattern.search(text):
        raise ValueError(f"REPRODUCTION.md has no block for {name}: add the two markers {begin_marker(name)!r} and "
                         f"{end_marker(name)!r}")
    block = f"{begin_marker(name)}\n{study_block(name, record)}\n{end_marker(name)}"
    return pattern.sub(lambda _m: block, text, count=1)


def block_names(text: str) -> list[str]:
    return re.findall(r"<!-- generated from results/studies/(\w+)/results\.json", text)


def rebuilt(text: str, studies: Path = STUDIES) -> str:
    for name in block_names(text):
        text = refreshed(text, name, read_json(studies / name / RESULTS_FILE))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a block is stale")
    parser.add_argument("--collect", nargs=2, metavar=("NAME", "DIR"), help="first copy the study in DIR")
    args = parser.parse_args()
    if args.collect:
        print(f"copied into {collect(args.collect[0], Path(args.collect[1]))}")
    text = REPRODUCTION.read_text()
    try:
        new = rebuilt(text)
    except (ValueError, OSError, TypeError) as exc:
        sys.exit(f"scripts/reproduction.py: {exc}")
    if args.check:
        if new != text:
            sys.exit("REPRODUCTION.md is stale: run scripts/reproduction.py")
        return
    REPRODUCTION.write_text(new)


if __name__ == "__main__":
    main()
