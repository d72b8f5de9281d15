"""Experiment tracking in MLflow, through MLflow's own client (`mlflow.MlflowClient`), driven by the dispatcher.

With ``IGAT_MLFLOW_TRACKING_URI`` set, every experiment that runs is an MLflow run of the MLflow experiment
``IGAT_MLFLOW_EXPERIMENT`` (default ``igat``), named after it and tagged ``igat.experiment_id``:

- params: its spec, flattened (``base.train.lr``); a value is JSON text (a string as it is), cut at MLflow's
  MAX_PARAM_VALUE characters;
- metrics: each (phase, epoch) row the dispatcher stored as ``<phase>/<name>`` at step = epoch, and once it has
  finished the numbers of results.json's ``evaluation`` and ``improvement`` as ``eval/<model>/<combiner>/<attack>``
  and ``improvement/<combiner>/<attack>`` (step 0);
- artifacts: results.json, report.md and the plots of at most MAX_FIGURE_BYTES each;
- its end: FINISHED, FAILED or KILLED for succeeded, failed, cancelled (`END_STATUS`).

A study is a parent run (tag ``igat.study_id``) that its experiments' runs are nested in (``mlflow.parentRunId``),
ended once each of them has been, with the study's results.json.

Exactly once: the run id is kept on the experiment (or study) row by a compare-and-swap, so a restarted dispatcher
and the next attempt of a re-queued run log to the same run; whoever takes a run over first reads back the steps MLflow
holds, and logs each (metric, step) once (a step a resumed run redoes keeps its first value). A finished experiment's
tracking is completed under its lease by one dispatcher (`store.claim_untracked`), and ``tracked_at`` records it.

MLflow being away never stops the dispatcher nor fails an experiment: the failure is a warning in the log and one
event on each experiment it held up, the rest of the tick leaves MLflow alone, and the next tick carries on from
where logging stopped. A request MLflow refuses (`REFUSED`) holds up only its experiment; a finished one is then left
as it is, with an event saying why. MLflow is imported inside `Tracking`'s methods only: without the URI nothing of
it is loaded. Unless the environment says otherwise, its client tries each request once, for at most 10 s, and prints
nothing (`CLIENT_DEFAULTS`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from igat_core import rundir
from service import store, studies
from service.db import session_scope
from service.models import CANCELLED, FAILED, SUCCEEDED, Experiment, Study
from service.settings import Settings
from service.storable import one_line, storable_json, storable_text, stored_number

log = logging.getLogger("igat.tracking")

MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_FIGURE_BYTES = 2 << 20
METRIC_ROWS_PER_READ = 1000
#: finished experiments (and studies) whose MLflow runs one tick completes, newest first
PER_TICK = 4
END_STATUS = {SUCCEEDED: "FINISHED", FAILED: "FAILED", CANCELLED: "KILLED"}
EXPERIMENT_TAG = "igat.experiment_id"
STUDY_TAG = "igat.study_id"
KIND_TAG = "igat.kind"
PARENT_TAG = "mlflow.parentRunId"
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
#: MLflow's error codes for a request it will never accept (as opposed to a server that is away or failing)
REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"})

_NOT_A_KEY = re.compile(r"[^\w\-. :/]")


# ------------------------------------------------------------------------------------------ what is logged


def flat_params(spec: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The spec as MLflow params: nested keys joined with dots, each value as JSON text (a string as it is)."""
    params: dict[str, str] = {}
    for name, value in spec.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, key + "."))
        else:
            params[metric_key(key)] = param_value(value)
    return params


def param_value(value: Any) -> str:
    text = storable_text(value if isinstance(value, str) else json.dumps(storable_json(value), sort_keys=True))
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def metric_key(key: str) -> str:
    """`key` in the characters MLflow allows in a name (others become ``_``), at most MAX_KEY of them."""
    return _NOT_A_KEY.sub("_", key)[:MAX_KEY]


def numeric_leaves(tree: Any, prefix: str) -> dict[str, float]:
    """Every number in the nested dicts of `tree`, keyed by its path below `prefix` ("eval/igat/average/pgd")."""
    if isinstance(tree, dict):
        return {k: v for name, sub in tree.items() for k, v in numeric_leaves(sub, f"{prefix}/{name}").items()}
    number = stored_number(tree)
    return {} if number is None else {metric_key(prefix): number}


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """results.json's accuracies (``eval/<model>/<combiner>/<attack>``, eps, examples) and relative improvements."""
    return {**numeric_leaves(results.get("evaluation"), "eval"),
            **numeric_leaves(results.get("improvement"), "improvement")}


def artifacts(run_dir: Path) -> list[tuple[Path, str | None]]:
    """(file, directory in the MLflow run) of each artifact the run directory holds: results, report, small plots."""
    found = []
    for path, size in rundir.artifact_files(run_dir):
        plot = path.startswith(rundir.PLOTS_DIR + "/") and path.endswith(".png") and size <= MAX_FIGURE_BYTES
        if path in (rundir.RESULTS_FILE, rundir.REPORT_FILE) or plot:
            found.append((run_dir / path, str(Path(path).parent) if plot else None))
    return found


def without_password(uri: str) -> str:
    """`uri` with the password of its user info, if any, replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def millis(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


# ------------------------------------------------------------------------------------------------ logging


@dataclass
class Followed:
    """An MLflow run being logged to: what it holds, and the last metric row logged."""

    run_id: str
    logged: set[tuple[str, int]] = field(default_factory=set)
    after: int = 0


class TrackingUnavailable(RuntimeError):
    """Tracking is asked for but cannot work here (MLflow is not installed)."""


class Unavailable(Exception):
    """MLflow could not be reached, or failed: nothing more is sent to it this tick."""


class Tracking:
    """Logs the experiments of one dispatcher to MLflow; `tick` is called at the end of each dispatcher tick."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], owner: str):
        assert settings.mlflow_tracking_uri, "Tracking needs IGAT_MLFLOW_TRACKING_URI"
        if importlib.util.find_spec("mlflow") is None:
            raise TrackingUnavailable("IGAT_MLFLOW_TRACKING_URI is set, but MLflow is not installed: pip install "
                                      "-r requirements-mlflow.txt")
        self.uri = settings.mlflow_tracking_uri
        self.shown_uri = without_password(self.uri)
        self.experiment_name = settings.mlflow_experiment
        self.artifact_root = Path(settings.artifact_root).resolve()
        self.lease_s = settings.lease_s
        self.sessions = sessions
        self.owner = owner
        self.followed: dict[str, Followed] = {}
        self.failing: set[str] = set()  # experiments whose tracking failed since it last worked (event recorded)
        self.away: str | None = None  # why MLflow was unavailable on the last try
        self._client: Any = None
        self._experiment_id: str | None = None

    @classmethod
    def configured(cls, settings: Settings, sessions: sessionmaker[Session], owner: str) -> Tracking | None:
        return cls(settings, sessions, owner) if settings.mlflow_tracking_uri else None

    @property
    def client(self) -> Any:
        if self._client is None:
            for name, value in CLIENT_DEFAULTS.items():
                os.environ.setdefault(name, value)
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # ------------------------------------------------------------------------------------------- the tick

    def tick(self, active: Iterable[str]) -> None:
        """Log what is new of the `active` experiments (this dispatcher's), then complete the runs of finished
        experiments and studies. Database errors propagate (the dispatcher's loop retries); MLflow's never do."""
        active = list(active)
        work: list[tuple[str | None, Callable[[], None]]] = [(e, lambda e=e: self.follow(e)) for e in active]
        with session_scope(self.sessions) as session:
            finished = store.claim_untracked(session, owner=self.owner, lease_s=self.lease_s, limit=PER_TICK)
            closing = store.studies_to_close(session, limit=PER_TICK)
        work += [(e.id, lambda e=e: self.finish(e)) for e in finished]
        work += [(None, lambda s=s: self.close_study(s)) for s in closing]
        for position, (experiment_id, step) in enumerate(work):
            try:
                self.guarded(experiment_id, step)
            except Unavailable as exc:
                for held_up, _ in work[position:]:
                    self.record_failure(held_up, str(exc))
                break
        self.followed = {e: f for e, f in self.followed.items() if e in active}

    def guarded(self, experiment_id: str | None, step: Callable[[], None]) -> None:
        """Run one experiment's (or study's) `step`; raise `Unavailable` when MLflow is away or failing."""
        try:
            step()
        except SQLAlchemyError:
            raise
        except Exception as exc:
            self.failed(experiment_id, exc)
            return
        if self.away is not None:
            log.info("MLflow at %s is available again", self.shown_uri)
            self.away = None
        self.failing.discard(experiment_id or "")

    def failed(self, experiment_id: str | None, exc: Exception) -> None:
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        reason = self.redacted(one_line(f"{type(exc).__name__}: {exc}", 300))
        if isinstance(exc, MlflowException) and exc.error_code in REFUSED and experiment_id is not None:
            self.refused(experiment_id, reason)
        elif isinstance(exc, MlflowException | RequestException):
            if self.away is None:
                log.warning("MLflow at %s is unavailable (%s); retrying on the next tick", self.shown_uri, reason)
            self.away = reason
            raise Unavailable(reason) from exc
        else:
            log.exception("MLflow tracking of %s failed", experiment_id or "a study")
            self.record_failure(experiment_id, reason)

    def redacted(self, text: str) -> str:
        """`text` without the password the tracking URI may hold (events are public)."""
        return text.replace(self.uri, self.shown_uri) if self.uri != self.shown_uri else text

    def record_failure(self, experiment_id: str | None, reason: str) -> None:
        """One event per experiment and outage: tracking it failed, and is retried."""
        if experiment_id is None or experiment_id in self.failing:
            return
        self.failing.add(experiment_id)
        with session_scope(self.sessions) as session:
            store.add_event(session, experiment_id, "message",
                            f"MLflow tracking failed: {reason}; retrying on the next tick")

    def refused(self, experiment_id: str, reason: str) -> None:
        """MLflow refused a request of this experiment's: a finished one is left as it is, a running one retried."""
        log.warning("MLflow refused to log %s: %s", experiment_id, reason)
        self.followed.pop(experiment_id, None)
        with session_scope(self.sessions) as session:
            given_up = store.mark_tracked(session, experiment_id, owner=self.owner)
            if given_up:
                store.add_event(session, experiment_id, "message",
                                f"MLflow refused to log this experiment: {reason}; its MLflow run is left as it is")
        if not given_up:
            self.record_failure(experiment_id, reason)

    # -------------------------------------------------------------------------------------- experiments

    def follow(self, experiment_id: str) -> None:
        """Open the experiment's run if needed and log its new metric rows."""
        followed = self.followed.get(experiment_id)
        if followed is None:
            with session_scope(self.sessions) as session:
                experiment = store.get_experiment(session, experiment_id)
            followed = self.open(experiment)
        self.log_new_metrics(experiment_id, followed)

    def finish(self, experiment: Experiment) -> None:
        """Log everything the finished experiment left that its run lacks, and end the run."""
        followed = self.followed.get(experiment.id) or self.open(experiment)
        while self.log_new_metrics(experiment.id, followed):
            pass
        run_dir = Path(experiment.run_dir) if experiment.run_dir else rundir.run_dir_of(self.artifact_root,
                                                                                        experiment.id)
        results = rundir.read_results(run_dir)
        if results is not None:
            finals = final_metrics(results)
            self.log_metrics(followed, [(key, value, millis(experiment.finished_at), 0)
                                        for key, value in finals.items()])
        for path, where in artifacts(run_dir):
            self.client.log_artifact(followed.run_id, str(path), where)
        self.client.set_terminated(followed.run_id, END_STATUS[experiment.status],
                                   end_time=millis(experiment.finished_at))
        with session_scope(self.sessions) as session:
            store.mark_tracked(session, experiment.id, owner=self.owner)
        self.followed.pop(experiment.id, None)

    def open(self, experiment: Experiment) -> Followed:
        """The experiment's run (its own, found by its tag, or a new one), its params logged, what it holds read."""
        run_id = experiment.mlflow_run_id
        if run_id is None:
            found = self.find_run({EXPERIMENT_TAG: experiment.id})
            run_id = self.keep(Experiment, experiment.id, found or self.create_run(experiment))
        followed = Followed(run_id, self.logged_steps(run_id))
        self.log_params(run_id, flat_params(experiment.spec))
        self.followed[experiment.id] = followed
        return followed

    def create_run(self, experiment: Experiment) -> str:
        tags = {EXPERIMENT_TAG: experiment.id, KIND_TAG: "experiment"}
        if experiment.study_id is not None:
            tags |= {STUDY_TAG: experiment.study_id, PARENT_TAG: self.study_run(experiment.study_id)}
        run = self.client.create_run(self.experiment_id(), start_time=millis(experiment.started_at), tags=tags,
                                     run_name=experiment.name)
        return run.info.run_id

    def log_new_metrics(self, experiment_id: str, followed: Followed) -> bool:
        """Log the metric rows stored since the last one logged; True when more may follow this page."""
        with session_scope(self.sessions) as session:
            rows = store.metrics_after(session, experiment_id, followed.after, limit=METRIC_ROWS_PER_READ)
        self.log_metrics(followed, [(key, value, millis(row.updated_at), row.epoch) for row in rows
                                    for key, value in numeric_leaves(row.values, row.phase).items()])
        if rows:
            followed.after = rows[-1].id
        return len(rows) == METRIC_ROWS_PER_READ

    def log_metrics(self, followed: Followed, metrics: list[tuple[str, float, int | None, int]]) -> None:
        """Log each (key, value, time, step) whose key and step the run does not hold yet (the client splits a long
        list into the requests MLflow takes)."""
        from mlflow.entities import Metric

        new = {(key, step): Metric(key, value, timestamp or 0, step) for key, value, timestamp, step in metrics
               if (key, step) not in followed.logged}
        if new:
            self.client.log_batch(followed.run_id, metrics=list(new.values()))
            followed.logged.update(new)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Params are MLflow's to keep: logging the same value again is accepted, a changed one refused."""
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])

    def logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """The (metric, step) pairs the run holds."""
        keys = self.client.get_run(run_id).data.metrics
        return {(key, metric.step) for key in keys for metric in self.client.get_metric_history(run_id, key)}

    # ------------------------------------------------------------------------------------------- studies

    def study_run(self, study_id: str) -> str:
        """The study's parent run: its own, found by its tag, or a new one with the study's spec as params."""
        with session_scope(self.sessions) as session:
            study = store.get_study(session, study_id)
        if study.mlflow_run_id is not None:
            return study.mlflow_run_id
        run_id = self.find_run({STUDY_TAG: study.id, KIND_TAG: "study"})
        if run_id is None:
            run = self.client.create_run(self.experiment_id(), start_time=millis(study.created_at), run_name=study.name,
                                         tags={STUDY_TAG: study.id, KIND_TAG: "study"})
            self.log_params(run.info.run_id, flat_params(study.spec))
            run_id = run.info.run_id
        return self.keep(Study, study.id, run_id)

    def close_study(self, study: Study) -> None:
        """End the parent run of a study whose experiments have all ended, with the study's results.json."""
        assert study.mlflow_run_id is not None
        with session_scope(self.sessions) as session:
            experiments = store.study_experiments(session, [study.id])[study.id]
        record = storable_json(studies.results(study, experiments, self.artifact_root))
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_dict(study.mlflow_run_id, record, rundir.RESULTS_FILE)
            self.client.set_terminated(study.mlflow_run_id, END_STATUS[studies.study_status(study, experiments)])
        except MlflowException as exc:
            if exc.error_code not in REFUSED:
                raise
            log.warning("MLflow refused to end the run of study %s (%s); it is left as it is", study.id, exc)
        with session_scope(self.sessions) as session:
            store.mark_study_tracked(session, study.id)

    # -------------------------------------------------------------------------------------------- shared

    def experiment_id(self) -> str:
        """The MLflow experiment the runs go to, created when missing."""
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                from mlflow.exceptions import MlflowException

                try:
                    self.client.create_experiment(self.experiment_name)
                except MlflowException as exc:  # another dispatcher created it meanwhile
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                found = self.client.get_experiment_by_name(self.experiment_name)
            self._experiment_id = found.experiment_id
        return self._experiment_id

    def find_run(self, tags: dict[str, str]) -> str | None:
        """The run of our MLflow experiment carrying these tags (ids: no quotes inside), or None."""
        query = " and ".join(f"tags.`{name}` = '{value}'" for name, value in tags.items())
        found = self.client.search_runs([self.experiment_id()], filter_string=query, max_results=1)
        return found[0].info.run_id if found else None

    def keep(self, model: type[Experiment] | type[Study], row_id: str, run_id: str) -> str:
        """Record `run_id` on the row unless another run was recorded first; the other run wins, ours is deleted."""
        with session_scope(self.sessions) as session:
            kept = store.keep_run_id(session, model, row_id, run_id)
        assert kept is not None
        if kept != run_id:
            self.client.delete_run(run_id)
        return kept
