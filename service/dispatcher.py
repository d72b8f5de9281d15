"""The dispatcher: moves experiments from the queue (the ``experiments`` table) to an executor and back.

One tick:

1. renew the leases of the runs this dispatcher watches (a run whose lease was taken over is dropped);
2. adopt orphans: running/cancelling experiments whose dispatcher is dead (lease expired, or a dead pid on
   this host). A run whose process is still alive is re-attached; one whose process is gone is re-queued
   (``attempt`` grows on the next claim; the resumable runner continues from its checkpoints), or failed
   once ``max_attempts`` starts are used up;
3. for each watched run: poll the executor, copy new lines of ``events.jsonl`` / ``metrics.jsonl`` into the
   database (exactly once, see `service.store.ingest_events` / `upsert_metrics`), forward cancel requests
   (SIGTERM, then SIGKILL after ``cancel_grace_s``), and record the outcome once the process has ended;
4. fail the queued experiments whose base experiment ended without a pretrained base (a study's dependency
   that can never be met), then claim ready experiments (queued, and their base experiment's pretrained base
   finished, if they depend on one; `service.store.claim_next`) while fewer than ``max_concurrent_experiments``
   run here and the next one's ``resources`` fit in what ``max_concurrent_cpus`` leaves, and start them. A
   study's runs that wait for a base never hold a slot: other ready work is claimed;
5. with ``IGAT_MLFLOW_TRACKING_URI`` set, log the runs it watches and the finished experiments and studies to
   MLflow (`service.tracking`; MLflow being away fails nothing and is retried on the next tick).

A fault of one experiment (a value its run wrote that cannot be stored, a run directory that cannot be read) is
confined to it (`Dispatcher.confined`): its run is stopped and it ends ``failed`` with a one-line reason, while the
dispatcher goes on with the others. A database that is away for a moment (a restart, a lock) is no one's fault: the
next tick retries, and the compare-and-swaps of `service.store` keep every line stored exactly once.

Run it with ``python -m service.dispatcher`` (``igat serve`` starts one next to the API). It is the queue side
of the service and reaches the workers only through an executor (`workers.executors`); this module imports
neither torch nor ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from igat_core import rundir
from service import store
from service.db import make_engine, make_session_factory, session_scope
from service.models import CANCELLED, CANCELLING, FAILED, QUEUED, RUNNING, SUCCEEDED, Experiment
from service.settings import Settings, get_settings
from service.storable import one_line
from service.tracking import Tracking, TrackingUnavailable
from workers.executors import Executor, ExecutorUnavailable, ExperimentRun, Handle, RunState, make_executor

log = logging.getLogger("igat.dispatcher")

MAX_LINES_PER_TICK = 5000
MAX_BYTES_PER_READ = 4 * 1024 * 1024


@dataclass
class Watched:
    """A run this dispatcher is responsible for."""

    experiment_id: str
    handle: Handle
    run_dir: Path
    attempt: int
    events_offset: int | None = None  # bytes of events.jsonl consumed; None: recompute from the DB counter
    events_ingested: int = 0
    metrics_signature: tuple[int, int] | None = None
    metrics_sent: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    cancel_sent_at: float | None = None
    cpus: float = 1.0  # resources.requested_cpus of its spec
    ended: RunState | None = None  # the poll that saw the process end (kept if recording its outcome is retried)


class Dispatcher:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        session_factory: sessionmaker[Session] | None = None,
        executor: Executor | None = None,
        owner: str | None = None,
    ):
        self.settings = settings or get_settings()
        self._engine = None
        if session_factory is None:
            self._engine = make_engine(self.settings.database_url)
            session_factory = make_session_factory(self._engine)
        self.sessions = session_factory
        self.executor = executor or configured_executor(self.settings)
        self.owner = owner or store.dispatcher_identity()
        self.artifact_root = Path(self.settings.artifact_root).resolve()
        self.watched: dict[str, Watched] = {}
        self.tracking = Tracking.configured(self.settings, self.sessions, self.owner)

    # ---------------------------------------------------------------------------------------------- the loop

    def run(self, stop: threading.Event) -> None:
        log.info("dispatcher %s: executor %s, artifacts under %s", self.owner, self.executor.name, self.artifact_root)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # keep the loop alive through a transient DB error; the next tick retries
                log.exception("dispatcher tick failed")
            stop.wait(self.settings.dispatcher_poll_s)
        log.info("dispatcher %s stopping; %d run(s) keep going and will be re-attached", self.owner, len(self.watched))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def tick(self) -> None:
        self.renew_leases()
        self.adopt_orphans()
        for watched in list(self.watched.values()):
            self.confined(watched, lambda w=watched: self.service(w))
        self.fail_blocked_dependents()
        self.claim_and_start()
        if self.tracking is not None:
            self.tracking.tick(self.watched)

    def confined(self, watched: Watched, body: Callable[[], None]) -> None:
        """Run `body`, a step for one experiment: if it fails for a reason of the experiment's own, stop its run and
        fail it with that reason (one line; the traceback goes to this dispatcher's log). A database that is
        unreachable for the moment fails nothing: the next tick retries."""
        try:
            body()
        except Exception as exc:
            if database_unavailable(exc):
                log.warning("experiment %s: the database is unavailable (%s); retrying on the next tick",
                            watched.experiment_id, describe(exc))
                return
            log.exception("experiment %s: failing it after an error of its own", watched.experiment_id)
            self._abandon(watched, f"the dispatcher could not record the run: {describe(exc)}")

    def _abandon(self, watched: Watched, why: str) -> None:
        if watched.handle:
            try:
                self.executor.cancel(watched.handle, force=True)
                self.executor.release(watched.handle)
            except Exception:
                log.exception("could not stop the run of experiment %s", watched.experiment_id)
        try:  # no artifact list: the API lists the run directory live when none was recorded
            with session_scope(self.sessions) as session:
                store.transition(session, watched.experiment_id, FAILED, from_=[RUNNING, CANCELLING],
                                 message=f"failed: {why}", error=why, run_dir=str(watched.run_dir))
        except store.IllegalTransition as exc:
            log.warning("experiment %s: %s", watched.experiment_id, exc)
        except Exception:  # the database went away meanwhile: the next tick finds the run ended, and retries
            log.exception("could not record the failure of experiment %s", watched.experiment_id)
            return
        self.watched.pop(watched.experiment_id, None)

    # ------------------------------------------------------------------------------------------------ leases

    def renew_leases(self) -> None:
        if not self.watched:
            return
        with session_scope(self.sessions) as session:
            kept = store.renew_leases(session, owner=self.owner, ids=list(self.watched), lease_s=self.settings.lease_s)
        for experiment_id in set(self.watched) - kept:
            log.warning("experiment %s is no longer ours (lease taken over or finished); dropping it", experiment_id)
            self.watched.pop(experiment_id)

    # ---------------------------------------------------------------------------------------------- recovery

    def adopt_orphans(self) -> None:
        with session_scope(self.sessions) as session:
            candidates = store.orphans(session, owner=self.owner, watched=self.watched)
        for candidate in candidates:
            run_dir = Path(candidate.run_dir) if candidate.run_dir else self.run_dir_of(candidate.id)
            fallback = Watched(candidate.id, candidate.executor_handle or {}, run_dir, candidate.attempt)
            self.confined(fallback, lambda c=candidate: self._take_over(c))

    def _take_over(self, candidate: Experiment) -> None:
        with session_scope(self.sessions) as session:
            experiment = store.take_over(session, candidate, owner=self.owner, lease_s=self.settings.lease_s)
        if experiment is not None:
            self._adopt(experiment, previous_owner=candidate.lease_owner)

    def _adopt(self, experiment: Experiment, previous_owner: str | None) -> None:
        run_dir = Path(experiment.run_dir) if experiment.run_dir else self.run_dir_of(experiment.id)
        handle = experiment.executor_handle or self.executor.find(run_dir)
        if handle is not None and self.executor.attach(handle):
            watched = Watched(experiment.id, handle, run_dir, experiment.attempt,
                              cpus=store.requested_cpus(experiment.spec))
            self.watched[experiment.id] = watched
            with session_scope(self.sessions) as session:
                store.set_fields(session, experiment.id, executor_handle=handle, run_dir=str(run_dir))
                store.add_event(
                    session, experiment.id, "message",
                    f"re-attached to the running process (pid {handle.get('pid')}) after its dispatcher was lost",
                    data={"previous_dispatcher": previous_owner},
                )
            log.info("re-attached to experiment %s (pid %s)", experiment.id, handle.get("pid"))
            return
        # The process is gone. Keep what it wrote, then decide.
        watched = Watched(experiment.id, handle or {}, run_dir, experiment.attempt)
        self.ingest(watched)
        if handle:
            self.executor.release(handle)
        if experiment.status == CANCELLING:
            self._finish(watched, CANCELLED, "cancelled (the process ended while no dispatcher was watching)")
        elif self._results_ok(run_dir):
            self._finish(watched, SUCCEEDED, "succeeded (finished while no dispatcher was watching)")
        else:
            self._requeue_or_fail(watched, "the run's process was lost with its dispatcher")

    def _requeue_or_fail(self, watched: Watched, why: str) -> None:
        attempt, limit = watched.attempt, self.settings.max_attempts
        with session_scope(self.sessions) as session:
            try:
                if attempt >= limit:
                    store.transition(
                        session, watched.experiment_id, FAILED, from_=[RUNNING],
                        message=f"failed: {why}; gave up after {attempt} attempt(s)",
                        error=f"{why}; gave up after {attempt} attempt(s)",
                    )
                else:
                    store.transition(
                        session, watched.experiment_id, QUEUED, from_=[RUNNING],
                        message=f"re-queued: {why}; the next attempt ({attempt + 1} of {limit}) "
                        "resumes from the run's checkpoints",
                        lease_owner=None, lease_expires_at=None, executor_handle=None,
                    )
            except store.IllegalTransition as exc:
                if exc.current == CANCELLING:
                    store.transition(session, watched.experiment_id, CANCELLED, from_=[CANCELLING],
                                     message="cancelled")
                else:
                    log.warning("could not re-queue %s: %s", watched.experiment_id, exc)
        self.watched.pop(watched.experiment_id, None)

    # ---------------------------------------------------------------------------------------- claim & start

    def run_dir_of(self, experiment_id: str) -> Path:
        return rundir.run_dir_of(self.artifact_root, experiment_id)

    def fail_blocked_dependents(self) -> None:
        with session_scope(self.sessions) as session:
            failed = store.fail_blocked_dependents(session)
        for experiment in failed:
            log.warning("experiment %s failed: %s", experiment.id, experiment.error)

    def free_cpus(self) -> float | None:
        """CPUs left under ``max_concurrent_cpus``; None (no limit) when unset or when nothing runs here."""
        if self.settings.max_concurrent_cpus is None or not self.watched:
            return None
        return self.settings.max_concurrent_cpus - sum(w.cpus for w in self.watched.values())

    def claim_and_start(self) -> None:
        while len(self.watched) < self.settings.max_concurrent_experiments:
            with session_scope(self.sessions) as session:
                experiment = store.claim_next(session, owner=self.owner, lease_s=self.settings.lease_s,
                                              executor=self.executor.name, free_cpus=self.free_cpus())
            if experiment is None:
                return
            self.start(experiment)

    def start(self, experiment: Experiment) -> None:
        run_dir = self.run_dir_of(experiment.id)
        run = ExperimentRun(experiment.id, experiment.spec, experiment.attempt, run_dir)
        try:
            handle = self.executor.start(run)
        except Exception as exc:
            log.exception("could not start experiment %s", experiment.id)
            with session_scope(self.sessions) as session:
                store.transition(
                    session, experiment.id, FAILED, from_=[RUNNING, CANCELLING],
                    message=f"failed to start: {exc}", error=f"could not start the run: {exc}", run_dir=str(run_dir),
                )
            return
        self.watched[experiment.id] = Watched(experiment.id, handle, run_dir, experiment.attempt,
                                              cpus=store.requested_cpus(experiment.spec))
        with session_scope(self.sessions) as session:
            store.set_fields(session, experiment.id, executor_handle=handle, run_dir=str(run_dir))
            detail = f" (pid {handle['pid']})" if "pid" in handle else ""
            store.add_event(
                session, experiment.id, "message",
                f"attempt {experiment.attempt} started on the {self.executor.name} executor{detail}",
                data={"attempt": experiment.attempt, "executor": self.executor.name},
            )

    # -------------------------------------------------------------------------------------- watching a run

    def service(self, watched: Watched) -> None:
        state = watched.ended or self.executor.poll(watched.handle)
        self.ingest(watched)
        with session_scope(self.sessions) as session:
            status = session.scalar(select(Experiment.status).where(Experiment.id == watched.experiment_id))
        if status is None or status not in (RUNNING, CANCELLING):
            self.watched.pop(watched.experiment_id, None)
            return
        if state.running:
            if status == CANCELLING:
                self._forward_cancel(watched)
            return
        watched.ended = state
        self.executor.release(watched.handle)
        code = state.exit_code
        results = self._results_ok(watched.run_dir)
        if results and (code == 0 or code is None):  # None: an adopted process, its exit status unreadable
            self._finish(watched, SUCCEEDED, "succeeded")
        elif status == CANCELLING or watched.cancel_sent_at is not None:
            self._finish(watched, CANCELLED, "cancelled: the run was stopped")
        elif code is None:  # adopted process: no exit status to read, and no results
            self._requeue_or_fail(watched, "the run's process ended without results (exit status unknown)")
        elif code < 0:  # killed by a signal we did not send (OOM killer, operator)
            self._requeue_or_fail(watched, f"the run was killed by signal {-code}")
        else:
            self._fail(watched, code)

    def _forward_cancel(self, watched: Watched) -> None:
        now = time.monotonic()
        if watched.cancel_sent_at is None:
            log.info("cancelling experiment %s", watched.experiment_id)
            self.executor.cancel(watched.handle)
            watched.cancel_sent_at = now
        elif now - watched.cancel_sent_at >= self.settings.cancel_grace_s:
            self.executor.cancel(watched.handle, force=True)

    def _fail(self, watched: Watched, code: int) -> None:
        if code == 0:
            reason = f"the runner exited 0 but wrote no readable {rundir.RESULTS_FILE}"
        elif code == 2:
            reason = "the runner rejected the spec (exit code 2)"
        else:
            reason = f"the runner exited with code {code}"
        tail = self.executor.error_tail(watched.handle)
        if tail:
            log.warning("experiment %s: %s; the end of its error output:\n%s", watched.experiment_id, reason, tail)
        summary = error_summary(tail)
        error = f"{reason}: {summary}" if summary else reason
        self._finish(watched, FAILED, f"failed: {error}", error=error)

    def _finish(self, watched: Watched, status: str, message: str, error: str | None = None) -> None:
        with session_scope(self.sessions) as session:
            fields: dict[str, Any] = {"run_dir": str(watched.run_dir)}
            if error is not None:
                fields["error"] = error
            try:
                if watched.run_dir.is_dir():
                    store.record_artifacts(session, watched.experiment_id, watched.run_dir)
                store.transition(
                    session, watched.experiment_id, status, from_=[RUNNING, CANCELLING], message=message, **fields
                )
            except store.IllegalTransition as exc:
                log.warning("experiment %s: %s", watched.experiment_id, exc)
        self.watched.pop(watched.experiment_id, None)

    @staticmethod
    def _results_ok(run_dir: Path) -> bool:
        return rundir.read_results(run_dir) is not None

    # -------------------------------------------------------------------------------------------- ingestion

    def ingest(self, watched: Watched) -> None:
        """Copy new complete lines of events.jsonl and changed metrics into the database."""
        self._ingest_events(watched)
        self._ingest_metrics(watched)

    def _ingest_events(self, watched: Watched) -> None:
        path = watched.run_dir / rundir.EVENTS_FILE
        for _ in range(100):  # bounded: a huge backlog is drained over several ticks
            if watched.events_offset is None:
                self._sync_event_offset(watched, path)
                if watched.events_offset is None:
                    return
            read = rundir.complete_lines(path, watched.events_offset, MAX_BYTES_PER_READ, MAX_LINES_PER_TICK)
            if read is None:
                log.warning("%s shrank; waiting for it to grow past the stored lines", path)
                watched.events_offset = None
                return
            if not read.lines:
                return
            events = [_parse_event(line) for line in read.lines]
            with session_scope(self.sessions) as session:
                ok = store.ingest_events(
                    session, watched.experiment_id, expected_ingested=watched.events_ingested, events=events
                )
            if not ok:
                log.warning("event counter of %s moved under us; re-reading it", watched.experiment_id)
                watched.events_offset = None
                continue
            watched.events_offset = read.offset
            watched.events_ingested += len(events)
            if not read.more:
                return

    def _sync_event_offset(self, watched: Watched, path: Path) -> None:
        """Set the byte offset just after the lines the database already holds (None while the file holds fewer)."""
        with session_scope(self.sessions) as session:
            stored = session.scalar(
                select(Experiment.events_ingested).where(Experiment.id == watched.experiment_id)
            ) or 0
        watched.events_offset = rundir.offset_after_lines(path, stored)
        watched.events_ingested = stored

    def _ingest_metrics(self, watched: Watched) -> None:
        path = watched.run_dir / rundir.METRICS_FILE
        try:
            stat = path.stat()
        except FileNotFoundError:
            return
        signature = (stat.st_size, stat.st_mtime_ns)
        if signature == watched.metrics_signature:
            return
        rows = rundir.metric_rows(path)
        if rows is None:
            return
        changed = [(p, e, v) for (p, e), v in rows.items() if watched.metrics_sent.get((p, e)) != v]
        if changed:
            with session_scope(self.sessions) as session:
                store.upsert_metrics(session, watched.experiment_id, changed)
            watched.metrics_sent.update({(p, e): v for p, e, v in changed})
        watched.metrics_signature = signature


def _parse_event(line: bytes) -> store.RunEvent:
    text = line.decode("utf-8", errors="replace").strip()
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deep for the parser: kept as text
        return store.RunEvent.from_line(None, raw=text)
    return store.RunEvent.from_line(record, raw=text)


def database_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached or is busy for now (connection lost, server restarting, locked): not a fault
    of the experiment being recorded."""
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DisconnectionError |
                  sa_exc.TimeoutError):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def describe(exc: BaseException) -> str:
    """An exception as one line: its type and message (a database error's first line, without its SQL)."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return one_line(f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__)


def error_summary(output: str) -> str:
    """What an error output says last, as one line: its last unindented line with the indented lines under it (the
    exception line of a traceback, a spec error with its fields). The whole output stays in the run's logs."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    if not lines:
        return ""
    start = max((i for i, line in enumerate(lines) if not line[0].isspace()), default=0)
    details = [line.strip() for line in lines[start + 1:]]
    return one_line(lines[start].strip() + (" " + "; ".join(details) if details else ""))


# ------------------------------------------------------------------------------------------------ entry point


def configured_executor(settings: Settings) -> Executor:
    """The executor that ``settings.executor`` names, given the settings it needs."""
    return make_executor(settings.executor, runner_command=settings.runner_command, data_root=settings.data_root,
                         ray_address=settings.ray_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.dispatcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--executor", choices=["local", "ray"], default=None, help="default: IGAT_EXECUTOR or local")
    parser.add_argument("--migrate", action="store_true", help="run the database migrations first")
    parser.add_argument("--once", action="store_true", help="run one tick and exit (debugging)")
    parser.add_argument("--log-level", default=os.environ.get("IGAT_LOG_LEVEL", "INFO"))
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (igat serve)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = get_settings()
    if args.executor:
        settings = settings.model_copy(update={"executor": args.executor})
    try:
        executor = configured_executor(settings)
    except ExecutorUnavailable as exc:
        print(f"igat dispatcher: {exc}")
        return 2
    if args.migrate:
        from service.db import migrate

        migrate(settings.database_url)
    try:
        dispatcher = Dispatcher(settings, executor=executor)
    except TrackingUnavailable as exc:
        print(f"igat dispatcher: {exc}")
        return 2
    stop = threading.Event()
    if args.once:
        dispatcher.tick()
        dispatcher.close()
        return 0

    def _stop(signum, _frame) -> None:
        log.info("signal %d: stopping after this tick", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    try:
        dispatcher.run(stop)
    finally:
        dispatcher.close()
    return 0


def _watch_parent(pid: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if os.getppid() != pid:
            log.warning("parent process %d is gone; stopping", pid)
            stop.set()


if __name__ == "__main__":
    raise SystemExit(main())
