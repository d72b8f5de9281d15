"""Progress events and the bars drawn from them: the throttle (on a fake clock), training's progress and
examples/s, the evaluation's per-attack progress (final accuracy = the result's, results unchanged, attacks
unchanged by their step callback), the bars on recorded events of a real quickstart run, and the silence script."""

from __future__ import annotations

import io
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from igat_core.attacks import MIM, MORA, PGD, AutoAttack, Bandits, CWLinf, LogitPGD, SignHunter, SimBA
from igat_core.defenses import Plain
from igat_core.ensemble import Ensemble
from igat_core.evaluate import EvalConfig, evaluate_ensemble
from igat_core.progress import EvalProgress, Event, Heartbeat, ProgressBars, Throttle, TrainProgress
from igat_core.rundir import RunLog
from igat_core.train import TrainConfig, fit
from scripts.event_gaps import silences
from tests.conftest import digits_config

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "tests" / "fixtures" / "quickstart_events.jsonl"

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """Time that moves only by `step` per reading (or when set)."""

    def __init__(self, step: float = 0.0):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class Collected:
    """An `EventLog` that keeps its events as events.jsonl records."""

    def __init__(self):
        self.records: list[dict] = []

    def event(self, phase: str, event: str, message: str = "", **data: object) -> None:
        self.records.append({"phase": phase, "event": event, "message": message, **data})


def test_the_throttle_lets_one_event_through_per_interval():
    clock = FakeClock()
    throttle = Throttle(5.0, clock)
    seen = []
    for now in (1.0, 4.9, 5.0, 6.0, 9.9, 10.1, 30.0, 30.5):
        clock.now = now
        seen.append(throttle.due())
    assert seen == [False, False, True, False, False, True, True, False]
    clock.now = 33.0
    throttle.restart()
    clock.now = 37.0
    assert not throttle.due()


def test_training_progress_comes_at_most_every_interval_with_rate_and_eta():
    clock, log = FakeClock(), Collected()
    progress = TrainProgress(log, "igat", epochs=3, interval_s=5.0, clock=clock)
    for epoch in (1, 2):
        progress.start_epoch()
        for batch in range(1, 11):  # 2 s per batch of 64
            clock.now += 2.0
            progress.batch(epoch, batch, 10, 64 * batch)
    assert [(r["epoch"], r["batch"]) for r in log.records] == [(1, 3), (1, 6), (1, 9), (2, 3), (2, 6), (2, 9)]
    first = log.records[0]
    assert first["phase"] == "igat" and first["event"] == "progress"
    assert (first["epochs"], first["batches"]) == (3, 10)
    assert first["examples_per_s"] == pytest.approx(64 * 3 / 6.0)
    assert first["eta_s"] == pytest.approx(2.0 * (7 + 2 * 10))  # 7 batches of epoch 1, then 2 epochs of 10
    assert log.records[-1]["eta_s"] == pytest.approx(2.0 * (1 + 10))


def test_fit_reports_examples_per_s_per_epoch_and_progress_within_epochs(digits_train, tmp_path):
    subset = type(digits_train)(digits_train.images[:128], digits_train.labels[:128], digits_train.info)
    torch.manual_seed(3)
    log = RunLog(tmp_path)
    events = TrainProgress(log, "pretrain", epochs=2, clock=FakeClock(step=10.0))
    fit(Ensemble(digits_config(width=8), members=2), Plain(), subset, TrainConfig(epochs=2, batch_size=32, lr=0.05),
        tmp_path / "ckpt", progress=False, phase="pretrain", report=lambda m, _: log.metrics(m), events=events)
    records = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(r["examples_per_s"] > 0 and "examples/s" in r["message"] for r in epochs)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["examples_per_s"] for m in metrics] == [r["examples_per_s"] for r in epochs]
    progress = [(r["epoch"], r["batch"], r["batches"]) for r in records if r["event"] == "progress"]
    # every batch but an epoch's last (its epoch event follows), as the fake clock moves 10 s per reading
    assert progress == [(e, b, 4) for e in (1, 2) for b in (1, 2, 3)]


SMALL = dict(eps=0.3, step=0.075, steps=5, signhunter_queries=40, sanity_pgd_steps=6, sanity_pgd_restarts=2,
             sanity_examples=6)
EVALUATED = ("natural", "pgd", "signhunter")


@pytest.fixture(scope="module")
def evaluated(trained_ensemble, digits_test):
    """One evaluation of 12 examples in one batch, with and without progress events (a clock that moves 10 s per
    reading lets every step through the throttle); every attack's own steps are the next tests'."""
    x, y = digits_test.images[::30][:12], digits_test.labels[::30][:12]
    config = EvalConfig(attacks=EVALUATED, batch_size=12, **SMALL)
    log = Collected()
    reported = evaluate_ensemble(trained_ensemble, x, y, config, progress=False,
                                 events=EvalProgress(log, "base", clock=FakeClock(step=10.0)))
    plain = evaluate_ensemble(trained_ensemble, x, y, config, progress=False)
    return reported, plain, log.records


def test_reporting_progress_leaves_the_evaluation_unchanged(evaluated):
    reported, plain, _ = evaluated
    assert reported.accuracy == plain.accuracy and reported.cost == plain.cost
    assert [c.to_dict() for c in reported.sanity] == [c.to_dict() for c in plain.sanity]


def test_each_attack_ends_with_one_event_carrying_its_result(evaluated):
    reported, _, records = evaluated
    assert {r["phase"] for r in records} == {"evaluate"} and {r["event"] for r in records} == {"progress"}
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        runs.setdefault((r["combiner"], r["attack"]), []).append(r)
    assert set(runs) == {(c, a) for c in ("average", "max") for a in (*EVALUATED, "pgd-strong")}
    for (combiner, attack), events in runs.items():
        assert [e["done"] for e in events] == sorted(e["done"] for e in events)
        assert [e["done"] == e["total"] for e in events] == [False] * (len(events) - 1) + [True]
        total = 6 if attack == "pgd-strong" else 12
        assert {e["total"] for e in events} == {total} and events[-1]["eta_s"] == 0.0
        assert all(e["model"] == "base" and 0.0 <= e["accuracy"] <= 100.0 for e in events)
        if attack != "pgd-strong":
            assert events[-1]["accuracy"] == reported.accuracy[combiner][attack]
        if attack != "natural":  # one batch: every earlier event came from within an attack call
            assert len(events) > 1


def test_running_accuracy_falls_from_natural_to_robust_within_pgd(evaluated):
    reported, _, records = evaluated
    pgd = [r for r in records if r["combiner"] == "average" and r["attack"] == "pgd"]
    assert pgd[0]["accuracy"] <= reported.accuracy["average"]["natural"]
    assert pgd[-1]["accuracy"] == reported.accuracy["average"]["pgd"] < pgd[0]["accuracy"]


ATTACKS = {
    "pgd": lambda m: PGD(m, 0.1, 0.025, 4, restarts=2, generator=torch.Generator().manual_seed(1)),
    "cw": lambda m: CWLinf(m, 0.1, 0.025, 4, generator=torch.Generator().manual_seed(1)),
    "mim": lambda m: MIM(m, 0.1, 0.025, 4),
    "autoattack": lambda m: AutoAttack(m, 0.1, steps=3, square_queries=20, components=("apgd-ce", "square")),
    "signhunter": lambda m: SignHunter(m, 0.1, queries=30),
    "simba": lambda m: SimBA(m, 0.1, queries=30, generator=torch.Generator().manual_seed(1)),
    "bandits": lambda m: Bandits(m, 0.1, queries=31, generator=torch.Generator().manual_seed(1)),
    "mora": lambda m: MORA(m, 0.1, steps=3, restarts=2, generator=torch.Generator().manual_seed(1)),
    "logit_pgd": lambda m: LogitPGD(m, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_an_attack_reports_its_steps_and_finds_the_same_examples(name, trained_ensemble, digits_test):
    x, y = digits_test.images[:10], digits_test.labels[:10]
    steps: list[tuple[float, int | None]] = []

    def step(fraction, standing):
        steps.append((fraction, None if standing is None else int(standing().sum())))
        assert standing is None or standing().shape == (10,)

    torch.manual_seed(0)
    quiet = ATTACKS[name](trained_ensemble)(x, y)
    torch.manual_seed(0)
    told = ATTACKS[name](trained_ensemble)(x, y, step=step)
    assert torch.equal(quiet, told)
    fractions = [f for f, _ in steps]
    assert len(steps) > 1 and fractions == sorted(fractions) and 0.0 < fractions[0] and fractions[-1] <= 1.0
    if name == "autoattack":  # within its first component (of two) too, by the forward passes it makes
        assert any(0.0 < f < 0.5 for f in fractions)
    assert all(s is None or 0 <= s <= 10 for _, s in steps)


# --------------------------------------------------------------------------------------------------- the bars


def recorded() -> list[dict]:
    return [json.loads(line) for line in RECORDED.read_text().splitlines()]


def replay(records: list[dict], bars_of) -> str:
    """The output of the bars fed `records` at their own times (the bars' clock reads the event's time)."""
    out = io.StringIO()
    clock = FakeClock()
    bars = bars_of(out, clock)
    for record in records:
        clock.now = datetime.fromisoformat(Event.of(record).time).timestamp()
        bars(record)
    bars.close()
    return out.getvalue()


def test_the_run_log_hands_each_event_it_writes_to_its_listener(tmp_path):
    heard: list[dict] = []
    log = RunLog(tmp_path, listener=heard.append)
    log.event("evaluate", "started", "evaluating")
    log.metrics({"phase": "igat", "epoch": 2, "loss": 0.5, "seconds": 2.0, "examples_per_s": 64.0})
    written = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert heard == written
    assert written[1]["examples_per_s"] == 64.0 and written[1]["message"] == "epoch 2: loss 0.5 (64 examples/s)"


def test_a_heartbeat_fills_only_a_silence_of_the_run(tmp_path):
    log = RunLog(tmp_path)
    clock = FakeClock()
    beating = Heartbeat(log, "run", interval_s=5.0, clock=clock)
    clock.now = 3.0
    beating.enter("pretrain")
    log.event("pretrain", "started", "pretrain: epochs 1..3")
    clock.now = 15.0
    beating.beat()
    path = tmp_path / "events.jsonl"
    assert len(path.read_text().splitlines()) == 1  # the last event is fresh: no beat
    path.write_text(json.dumps(at(time.time() - 1_800_000_006.0, "pretrain", "started")) + "\n")  # 6 s ago
    RunLog(tmp_path).event("job", "log", "a line of the Ray job's own output: no news of the run")
    beating.beat()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r.get("waited_s")) for r in records] == [("started", None), ("log", None), ("waiting", 12.0)]
    assert records[2]["message"] == "pretrain: still working (12s)"


def test_the_silence_script_finds_the_longest_gap_of_each_phase():
    def line(second: float, phase: str, event: str, message: str = "") -> str:
        when = datetime.fromtimestamp(1_800_000_000 + second).astimezone().isoformat()
        return json.dumps({"time": when, "phase": phase, "event": event, "message": message})

    lines = [line(0, "run", "started"), line(2, "pretrain", "started"), line(9, "pretrain", "epoch", "epoch 1"),
             line(10, "job", "log", "ray noise"), line(30, "pretrain", "finished"), line(31, "tune", "started"),
             line(35, "tune/alpha=1,beta=2", "epoch"), line(52, "tune", "finished"), line(53, "run", "finished")]
    found = {s.phase: s for s in silences(lines)}
    assert list(found) == ["pretrain", "tune", "all"]
    assert (found["pretrain"].events, found["pretrain"].seconds, found["pretrain"].longest) == (3, 28.0, 21.0)
    assert found["pretrain"].after == "pretrain epoch: epoch 1"  # Ray's log line does not end the silence
    assert (found["tune"].events, found["tune"].longest) == (3, 17.0)
    assert (found["all"].events, found["all"].seconds, found["all"].longest) == (8, 53.0, 21.0)


def at(second: float, phase: str | None, event: str, message: str = "", **data: object) -> dict:
    """An events.jsonl record `second` seconds into a run."""
    when = datetime.fromtimestamp(1_800_000_000 + second).astimezone().isoformat()
    return {"time": when, "phase": phase, "event": event, "message": message, **data}


def evaluate_progress(second: float, attack: str, done: int, accuracy: float) -> dict:
    return at(second, "evaluate", "progress", f"base [average] {attack}: {done}/100 attacked", model="base",
              combiner="average", attack=attack, done=done, total=100, accuracy=accuracy,
              eta_s=None if done == 100 else 30.0)


SEQUENCE = [
    at(0, "run", "started", "run quickstart on cpu"),
    at(1, "pretrain", "started", "pretrain: epochs 1..3", epochs=3),
    at(2, "job", "log", "a line of Ray's own output"),
    at(7, "pretrain", "waiting", "pretrain: still working (6s)", waited_s=6.0),
    at(12, "pretrain", "progress", "pretrain: epoch 1/3, batch 2/4", epoch=1, epochs=3, batch=2, batches=4,
       examples_per_s=20.0, eta_s=30.0),
    at(14, "pretrain", "epoch", "epoch 1: loss 2", epoch=1, examples_per_s=20.0),
    at(16, "pretrain", "epoch", "epoch 2: loss 1", epoch=2, examples_per_s=25.0),
    at(23, "pretrain", "epoch", "epoch 3: loss 0.5", epoch=3, examples_per_s=25.0),
    at(28, "pretrain", "waiting", "pretrain: still working (27s)", waited_s=27.0),
    at(29, "pretrain", "finished", "pretrain finished in 28.0s"),
    at(34, "evaluate", "started", "evaluating on the test split"),
    at(34, "evaluate", "model", "evaluating base", model="base"),
    evaluate_progress(35, "natural", 100, 98.0),
    evaluate_progress(40, "pgd", 40, 80.0),
    evaluate_progress(45, "pgd", 80, 70.0),
    evaluate_progress(46, "pgd", 100, 65.0),
    at(47, "evaluate", "diagnostics", "supplement Tables 4-8 for base", model="base"),
    at(48, "evaluate", "finished", "evaluate finished in 14.0s"),
    at(50, "run", "finished", "results.json and report.md written"),
]


def plain_bars(out, clock) -> ProgressBars:
    return ProgressBars(out, tty=False, clock=clock)


def test_without_a_terminal_each_bar_is_a_line_every_ten_seconds_besides_starts_and_ends():
    lines = replay(SEQUENCE, plain_bars).splitlines()
    shown = [line[20:] for line in lines]  # the time, cut
    assert shown == [
        "[run] started: run quickstart on cpu",
        "[pretrain] started: pretrain: epochs 1..3",
        "[pretrain] epoch: epoch 3: loss 0.5",  # the first bar event 10 s after its first (the waiting one)
        "[pretrain] waiting: pretrain: still working (27s)",  # held back, shown when the phase ends
        "[pretrain] finished: pretrain finished in 28.0s",
        "[evaluate] started: evaluating on the test split",
        "[evaluate] model: evaluating base",
        "[evaluate] progress: base [average] pgd: 80/100 attacked",  # 10 s after natural's
        "[evaluate] progress: base [average] pgd: 100/100 attacked",  # held back, shown before the next line
        "[evaluate] diagnostics: supplement Tables 4-8 for base",
        "[evaluate] finished: evaluate finished in 14.0s",
        "[run] finished: results.json and report.md written",
    ]
    assert lines[0].startswith(datetime.fromtimestamp(1_800_000_000).astimezone().isoformat()[:19])


def as_served(record: dict) -> dict:
    """The record as the service's SSE stream carries it (EventOut)."""
    data = {k: v for k, v in record.items() if k not in ("time", "phase", "event", "message")}
    return {"seq": 1, "time": record["time"], "phase": record["phase"], "kind": record["event"],
            "message": record["message"], "data": data or None}


def test_the_served_form_of_the_events_draws_the_same_bars():
    served = [as_served(r) for r in SEQUENCE]
    assert replay(served, plain_bars) == replay(SEQUENCE, plain_bars)
    assert replay(served, tty_bars) == replay(SEQUENCE, tty_bars)


def tty_bars(out, clock) -> ProgressBars:
    return ProgressBars(out, tty=True, clock=clock)


def test_on_a_terminal_each_phase_is_one_bar_that_ends_at_its_final_state():
    screen = replay(SEQUENCE, tty_bars)
    frames = [part.rstrip() for line in screen.split("\n") for part in line.split("\r") if part.strip()]
    pretrain = [f for f in frames if f.startswith("pretrain: ")]
    assert pretrain[0].endswith("| still working (6s)")
    assert "| epoch 1/3, batch 2/4, 20 examples/s, ETA 30s" in pretrain[1]
    assert pretrain[-2].endswith("| epoch 3/3, 25 examples/s, still working (27s)")
    assert pretrain[-1].startswith("pretrain: 100%") and pretrain[-1].endswith("| epoch 3/3, 25 examples/s")
    evaluate = [f for f in frames if f.startswith("evaluate base")]
    assert evaluate[0].startswith("evaluate base [average] natural: 100%")
    assert evaluate[1].startswith("evaluate base [average] pgd:  40%") and evaluate[1].endswith("ETA 30s")
    assert evaluate[-1].startswith("evaluate base [average] pgd: 100%")
    assert evaluate[-1].endswith("| 100/100 attacked, robust 65.0%")
    lines = [f[20:] for f in frames if f[:4].isdigit()]
    assert lines == [line[20:] for line in replay(SEQUENCE, plain_bars).splitlines()
                     if not any(f"] {kind}:" in line for kind in ("progress", "epoch", "waiting"))]
    assert "Ray's own output" not in screen


def test_the_bars_of_a_recorded_quickstart_run_without_a_terminal():
    """The events of a `make demo` run (every event but most of Ray's log lines, tests/fixtures/)."""
    records = recorded()
    lines = replay(records, plain_bars).splitlines()
    assert not [line for line in lines if "[job]" in line]
    assert len(lines) < len([r for r in records if r["event"] != "log"]) / 2
    phases = [r["phase"] for r in records if r["event"] == "started"]
    assert [line.split("]")[0][21:] for line in lines if "] started:" in line] == phases
    assert [line.split("]")[0][21:] for line in lines if "] finished:" in line] == phases[1:] + ["run"]
    bar_kinds = ("] progress:", "] epoch:", "] waiting:")
    for phase in phases:
        times = [datetime.fromisoformat(line[:19]).timestamp() for line in lines
                 if line[20:].startswith(f"[{phase}]") and any(kind in line for kind in bar_kinds)]
        others = sum(line[20:].startswith(f"[{phase}]") and not any(kind in line for kind in bar_kinds)
                     for line in lines)
        close = sum(b - a < 9.0 for a, b in zip(times, times[1:]))  # 9: the printed times are cut to the second
        assert close <= others, phase  # only a line held back, shown before another line of its phase


def test_the_bars_of_a_recorded_quickstart_run_on_a_terminal():
    records = recorded()
    screen = replay(records, tty_bars)
    frames = [part.rstrip() for line in screen.split("\n") for part in line.split("\r") if part.strip()]
    for phase in ("pretrain", "igat", "global_at"):
        epochs = next(r["epochs"] for r in records if r["phase"] == phase and r["event"] == "started")
        last = [f for f in frames if f.startswith(f"{phase}: ")][-1]
        assert last.startswith(f"{phase}: 100%") and f"| epoch {epochs}/{epochs}, " in last
    progress = [r for r in records if r["phase"] == "evaluate" and r["event"] == "progress"]
    final = progress[-1]
    last = [f for f in frames if f.startswith("evaluate ")][-1]
    assert last.startswith(f"evaluate {final['model']} [{final['combiner']}] {final['attack']}: 100%")
    assert last.endswith(f"| {final['total']}/{final['total']} attacked, robust {final['accuracy']:.1f}%")
