"""Progress of a running phase as events, and the terminal bars drawn from them.

Training and evaluation report progress through the run's `RunLog.event`, so events.jsonl, the service's
database and its SSE stream all carry it. Time-throttled so events.jsonl stays small: within a phase a
`progress` event comes at most once per PROGRESS_INTERVAL_S, plus one at the end of every attack.

- evaluate: ``progress`` with `model`, `combiner`, `attack`, `done` (examples attacked so far), `total`,
  `accuracy` (robust accuracy so far, %) and `eta_s` (`AttackProgress`);
- a training phase: ``progress`` with `epoch`, `epochs`, `batch`, `batches`, `examples_per_s` and `eta_s` (the
  phase's seconds left) within its epochs (`TrainProgress`); each epoch's own ``epoch`` event (`RunLog.metrics`)
  has `examples_per_s` too.

`ProgressBars` draws any stream of these events (an in-process run's, or the service's SSE) as tqdm bars, one
per phase; without a terminal it prints each phase's start and finish and at most one line per bar every
PLAIN_INTERVAL_S. `Heartbeat` fills a silence: a ``waiting`` event (`waited_s`) whenever the run's events have been
silent for PROGRESS_INTERVAL_S. Torch-free: the service's client imports it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from tqdm import tqdm

from igat_core.rundir import RunLog

PROGRESS_INTERVAL_S = 5.0
PLAIN_INTERVAL_S = 10.0
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {detail}"
BAR_KINDS = ("progress", "epoch", "waiting")

Clock = Callable[[], float]


class EventLog(Protocol):
    """Where progress events go: `igat_core.rundir.RunLog`."""

    def event(self, phase: str, event: str, message: str = "", **data: object) -> None: ...


class Throttle:
    """`due()` is True at most once per `interval_s` of `clock` time, and first `interval_s` after the start."""

    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S, clock: Clock = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.last = clock()

    def restart(self) -> None:
        self.last = self.clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the rate so far; None before any progress."""
    if done <= 0 or elapsed <= 0:
        return None
    return max(0.0, elapsed * (total - done) / done)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalProgress:
    """The evaluate phase's progress events for one model; `attack` starts those of one attack run."""

    log: EventLog
    model: str
    interval_s: float = PROGRESS_INTERVAL_S
    clock: Clock = time.monotonic

    def attack(self, combiner: str, attack: str, total: int) -> AttackProgress:
        return AttackProgress(self, combiner, attack, total, Throttle(self.interval_s, self.clock), self.clock())


@dataclass
class AttackProgress:
    """One attack run's events: `update` while it runs (throttled), `finish` once at its end (done == total)."""

    owner: EvalProgress
    combiner: str
    attack: str
    total: int
    throttle: Throttle
    started: float

    def update(self, done: int, accuracy: Callable[[], float]) -> None:
        """An event with `done` examples attacked and `accuracy()`, when the throttle allows one (none at the
        end: `finish` reports that)."""
        if done < self.total and self.throttle.due():
            self._emit(done, accuracy())

    def finish(self, accuracy: float) -> None:
        self._emit(self.total, accuracy)

    def _emit(self, done: int, accuracy: float) -> None:
        o = self.owner
        eta = 0.0 if done >= self.total else eta_seconds(done, self.total, o.clock() - self.started)
        left = "" if done >= self.total else f", ETA {duration(eta)}"
        o.log.event("evaluate", "progress", f"{o.model} [{self.combiner}] {self.attack}: {done}/{self.total} "
                    f"attacked, robust accuracy {accuracy:.1f}%{left}", model=o.model, combiner=self.combiner,
                    attack=self.attack, done=done, total=self.total, accuracy=accuracy, eta_s=eta)


# -------------------------------------------------------------------------------------------------- training


@dataclass
class TrainProgress:
    """A training phase's progress events within its epochs: at most one per `interval_s`, counted from the
    start of the epoch (an epoch shorter than that has only its epoch event)."""

    log: EventLog
    phase: str
    epochs: int
    interval_s: float = PROGRESS_INTERVAL_S
    clock: Clock = time.monotonic
    _throttle: Throttle = field(init=False, repr=False)
    _epoch_started: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._throttle = Throttle(self.interval_s, self.clock)
        self._epoch_started = self._throttle.last

    def start_epoch(self) -> None:
        self._throttle.restart()
        self._epoch_started = self._throttle.last

    def batch(self, epoch: int, batch: int, batches: int, examples: int) -> None:
        """After `batch` of the `batches` of `epoch`, with `examples` trained on in this epoch so far."""
        if batch >= batches or not self._throttle.due():
            return
        elapsed = self._throttle.last - self._epoch_started
        rate = examples / elapsed if elapsed > 0 else 0.0
        left = batches - batch + (self.epochs - epoch) * batches
        eta = elapsed / batch * left if batch else None
        self.log.event(self.phase, "progress", f"{self.phase}: epoch {epoch}/{self.epochs}, batch {batch}/{batches}, "
                       f"{rate:.0f} examples/s, ETA {duration(eta)}", epoch=epoch, epochs=self.epochs, batch=batch,
                       batches=batches, examples_per_s=rate, eta_s=eta)


@dataclass
class Heartbeat:
    """A `waiting` event whenever the run's events (any process's) have been silent for `interval_s`: the phase
    is at a step that reports nothing itself (a Ray Train run starting its workers, torch's first optimiser step
    importing its compiler, the diagnostics, the report's plots). `enter` names the phase it is in."""

    log: RunLog
    phase: str
    interval_s: float = PROGRESS_INTERVAL_S
    clock: Clock = time.monotonic
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def enter(self, phase: str) -> None:
        self.phase, self.started = phase, self.clock()

    def beat(self) -> None:
        if self.log.silent_for() >= self.interval_s:
            waited = self.clock() - self.started
            self.log.event(self.phase, "waiting", f"{self.phase}: still working ({duration(waited)})",
                           waited_s=waited)


@contextmanager
def heartbeat(log: RunLog, phase: str, interval_s: float = PROGRESS_INTERVAL_S) -> Iterator[Heartbeat]:
    """A `Heartbeat` for the block, beaten every fifth of `interval_s` by a thread."""
    beating, stop = Heartbeat(log, phase, interval_s), threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s / 5):
            beating.beat()

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield beating
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------------ the bars


@dataclass(frozen=True)
class Event:
    """One event, from an events.jsonl record (`event` is its kind, data inline) or the service's EventOut."""

    time: str
    phase: str | None
    kind: str
    message: str
    data: Mapping[str, Any]

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Event:
        if "kind" in record:
            return cls(str(record.get("time") or ""), record.get("phase"), str(record["kind"]),
                       str(record.get("message") or ""), record.get("data") or {})
        data = {k: v for k, v in record.items() if k not in ("time", "phase", "event", "message")}
        return cls(str(record.get("time") or ""), record.get("phase"), str(record.get("event") or "message"),
                   str(record.get("message") or ""), data)

    def line(self) -> str:
        phase = f"[{self.phase}] " if self.phase else ""
        return f"{self.time[:19]} {phase}{self.kind}: {self.message}".rstrip(": ")


@dataclass(frozen=True)
class BarState:
    """What a bar shows; `n` None keeps its count; a `waiting` detail follows the bar's last other one."""

    desc: str
    n: float | None
    total: float | None
    detail: str
    waiting: bool = False


def bar_state(event: Event, epochs: int | None) -> BarState:
    """What a phase's bar shows after a `progress`, `epoch` or `waiting` event (`epochs`: from the phase's start
    event)."""
    d = event.data
    if event.kind == "waiting":
        return BarState(str(event.phase), None, epochs, event.message.removeprefix(f"{event.phase}: "), waiting=True)
    if "attack" in d:
        eta = "" if d["done"] >= d["total"] else f", ETA {duration(d.get('eta_s'))}"
        return BarState(f"{event.phase} {d['model']} [{d['combiner']}] {d['attack']}", d["done"], d["total"],
                        f"{d['done']}/{d['total']} attacked, robust {d['accuracy']:.1f}%{eta}")
    epochs = d.get("epochs", epochs)
    rate = f", {d['examples_per_s']:.0f} examples/s" if d.get("examples_per_s") is not None else ""
    if "batch" in d:
        return BarState(str(event.phase), d["epoch"] - 1 + d["batch"] / d["batches"], epochs,
                        f"epoch {d['epoch']}/{epochs}, batch {d['batch']}/{d['batches']}{rate}, "
                        f"ETA {duration(d.get('eta_s'))}")
    return BarState(str(event.phase), d.get("epoch", 0), epochs, f"epoch {d.get('epoch')}/{epochs}{rate}")


class Bar(tqdm):
    """A tqdm bar whose format names `detail`: text after the bar (tqdm's postfix would start with a comma);
    `news` is its last detail that was not a `waiting` one, which it ends with."""

    def __init__(self, *args: Any, detail: str = "", news: str = "", **kwargs: Any):
        self.detail, self.news = detail, news
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        self.detail = self.news or self.detail
        super().close()

    @property
    def format_dict(self) -> dict[str, Any]:
        return {**super().format_dict, "detail": self.detail}


class ProgressBars:
    """Draws events as progress bars: one per phase (evaluate: one bar whose description names the model,
    combiner and attack), lines above them for everything else but Ray's own log lines. Without a terminal
    (`tty` False) a phase's bar is its progress and epoch events as lines, at most one per `plain_interval_s`,
    and the last one held back, if any, before the phase's next other line or at its end. The `run` phase's end
    ends every bar."""

    def __init__(self, file: TextIO | None = None, *, tty: bool | None = None, clock: Clock = time.monotonic,
                 plain_interval_s: float = PLAIN_INTERVAL_S):
        self.file = file if file is not None else sys.stdout
        self.tty = self.file.isatty() if tty is None else tty
        self.clock, self.plain_interval_s = clock, plain_interval_s
        self.bars: dict[str, Any] = {}
        self.throttles: dict[str, Throttle] = {}
        self.held: dict[str, str] = {}
        self.epochs: dict[str, int] = {}
        self.lock = threading.Lock()  # a run's heartbeat thread reports too

    def __call__(self, record: Mapping[str, Any]) -> None:
        event = Event.of(record)
        if event.kind == "log":
            return
        with self.lock:
            if event.kind in BAR_KINDS and event.phase:
                self._update(event)
                return
            if event.kind in ("finished", "failed") and event.phase:
                self._close("" if event.phase == "run" else event.phase)
            elif event.phase in self.held:
                self.write(self.held.pop(event.phase))
            if event.kind == "started" and event.phase and isinstance(event.data.get("epochs"), int):
                self.epochs[event.phase] = event.data["epochs"]
            self.write(event.line())

    def close(self) -> None:
        with self.lock:
            self._close("")

    def _update(self, event: Event) -> None:
        phase = str(event.phase)
        if not self.tty:
            throttle = self.throttles.setdefault(phase, Throttle(self.plain_interval_s, self.clock))
            self.held.pop(phase, None)
            if throttle.due():
                self.write(event.line())
            else:
                self.held[phase] = event.line()
            return
        state = bar_state(event, self.epochs.get(phase))
        bar = self.bars.get(phase)
        if bar is None:  # a new bar draws itself
            self.bars[phase] = Bar(desc=state.desc, total=state.total, initial=state.n or 0, detail=state.detail,
                                   news="" if state.waiting else state.detail, file=self.file, bar_format=BAR_FORMAT,
                                   dynamic_ncols=True, leave=True)
            return
        bar.total = state.total
        if state.n is not None:
            bar.n = state.n
        if state.waiting:
            bar.detail = f"{bar.news}, {state.detail}" if bar.news else state.detail
        else:
            bar.detail = bar.news = state.detail
        bar.set_description_str(state.desc, refresh=False)
        bar.refresh()

    def _close(self, phase: str) -> None:
        """The bars of `phase` and of its parts (`tune` closes `tune/<trial>`'s); of every phase for ""."""
        def ending(name: str) -> bool:
            return not phase or name == phase or name.startswith(f"{phase}/")

        for name in [p for p in self.bars if ending(p)]:
            self.bars.pop(name).close()
        for name in [p for p in self.held if ending(p)]:
            self.write(self.held.pop(name))
        self.throttles = {p: t for p, t in self.throttles.items() if not ending(p)}

    def write(self, line: str) -> None:
        """A line above the bars."""
        if self.bars:
            tqdm.write(line, file=self.file)
        else:
            print(line, file=self.file, flush=True)
