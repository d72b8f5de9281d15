"""Executors: how the dispatcher (``service/dispatcher.py``) runs one experiment.

An executor starts the experiment runner for one experiment and reports on it; the dispatcher owns every
database write. Handles are small JSON-able dicts that the dispatcher stores on the experiment row (and the
local executor also in the run directory), so a dispatcher that restarts can `attach` to a run it did not start.

- ``local``: `LocalProcessExecutor`, the runner as a subprocess in its own process group (tests, ``igat serve``).
- ``ray``: `RayJobsExecutor` (``workers/executors/ray_jobs.py``), the runner as a Ray Job on the cluster at
  ``IGAT_RAY_ADDRESS``; it is the only executor that imports Ray, lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

Handle = dict[str, Any]

EXECUTORS = ("local", "ray")


class ExecutorUnavailable(RuntimeError):
    """The requested executor cannot run here (not implemented yet, or its dependencies are missing)."""


@dataclass(frozen=True)
class ExperimentRun:
    """What an executor needs to start one attempt of an experiment."""

    experiment_id: str
    spec: dict[str, Any]
    attempt: int
    run_dir: Path


@dataclass(frozen=True)
class RunState:
    """A poll result. ``exit_code`` is None while running, and also for a finished run whose exit status is
    unknown (a process adopted after a dispatcher restart is not our child: we cannot read its status)."""

    running: bool
    exit_code: int | None = None


@runtime_checkable
class Executor(Protocol):
    name: str

    def start(self, run: ExperimentRun) -> Handle:
        """Launch the runner for ``run`` (writing ``spec.yaml`` into the run directory first); returns its handle."""
        ...

    def poll(self, handle: Handle) -> RunState: ...

    def cancel(self, handle: Handle, *, force: bool = False) -> None:
        """Ask the run to stop (SIGTERM to its process group), or kill it (``force``)."""
        ...

    def attach(self, handle: Handle) -> bool:
        """Adopt a run started by another (dead) dispatcher: True when it is still alive and now tracked."""
        ...

    def find(self, run_dir: Path) -> Handle | None:
        """The handle recorded in a run directory (for a run whose handle never reached the database)."""
        ...

    def release(self, handle: Handle) -> None:
        """After the run ended: free whatever is left (stray processes of its group, open files)."""
        ...

    def error_tail(self, handle: Handle, max_chars: int = 4000) -> str:
        """The end of the run's error output, for the experiment's ``error`` field."""
        ...


def make_executor(kind: str, *, runner_command: Sequence[str] = (), data_root: Path | None = None,
                  ray_address: str | None = None) -> Executor:
    """The executor named ``kind``: ``local`` runs ``runner_command``, ``ray`` submits to the Jobs API at
    ``ray_address``; both pass ``data_root`` to the run as IGAT_DATA_ROOT."""
    if kind == "local":
        from workers.executors.local import LocalProcessExecutor

        return LocalProcessExecutor(runner_command=list(runner_command), data_root=data_root)
    if kind == "ray":
        if not ray_address:
            raise ExecutorUnavailable(
                "the ray executor needs IGAT_RAY_ADDRESS (the Ray dashboard, e.g. http://127.0.0.1:8265); "
                "`igat serve` sets it after starting a local Ray head"
            )
        try:
            import ray.job_submission  # noqa: F401

            from workers.executors.ray_jobs import RayJobsExecutor
        except ImportError as exc:
            raise ExecutorUnavailable(f"the ray executor needs Ray with its job client (ray[default]): {exc}") from None
        return RayJobsExecutor(address=ray_address, data_root=data_root)
    raise ExecutorUnavailable(f"unknown executor {kind!r}; choose one of: {', '.join(EXECUTORS)}")
