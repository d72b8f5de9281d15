"""Run each experiment as a Ray Job: ``python -m workers.runner RUN_DIR/spec.yaml --out RUN_DIR``.

The submission id is deterministic, ``igat-<experiment id>-<attempt>``, so a dispatcher that crashes between
submitting and recording the handle finds the same job again instead of starting a second one (a repeated
submit is answered "already exists" and adopted). The run directory must be visible to the cluster's head
node under the same path (one machine, or a shared volume), as for Ray Train's storage.

Job states map to the dispatcher's view: PENDING/RUNNING are running; SUCCEEDED exits 0; FAILED exits with the
driver's exit status (a driver killed by a signal reads as a negative code, so the dispatcher re-queues it and
the next attempt resumes from the run's checkpoints); STOPPED reads as SIGTERM. Cancel is `stop_job` (SIGTERM
to the runner's process group, SIGKILL ``stop_wait_s`` later). While a job runs, each poll mirrors its log to
RUN_DIR/job.log and appends the new lines to events.jsonl as ``log`` events of phase ``job``.

Ray is imported lazily, here only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igat_core.rundir import HANDLE_FILE, JOB_LOG, SPEC_FILE, RunLog, read_json, write_text_atomic
from workers.executors import ExperimentRun, Handle, RunState

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_LOG_EVENTS_PER_POLL = 50
RUNNING_STATES = ("PENDING", "RUNNING")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def submission_id(experiment_id: str, attempt: int) -> str:
    return f"igat-{experiment_id}-{attempt}"


def exit_code_of(status: str, driver_exit_code: int | None) -> int | None:
    """The dispatcher's exit code for a finished job (None: unknown)."""
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return -int(signal.SIGTERM)
    if driver_exit_code is None:
        return 1
    if driver_exit_code > 128:  # the entrypoint shell reports a signalled child as 128 + signal
        return -(driver_exit_code - 128)
    return driver_exit_code or 1


@dataclass
class RayJobsExecutor:
    address: str
    python: str = sys.executable
    data_root: Path | None = None
    stop_wait_s: float = 10.0
    env: dict[str, str] = field(default_factory=dict)
    name: str = "ray"
    _client: Any = field(default=None, init=False, repr=False)

    @property
    def client(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    # -------------------------------------------------------------------------------------------- start / poll

    def start(self, run: ExperimentRun) -> Handle:
        from igat_core.spec import dump_spec, parse_spec

        run_dir = run.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / SPEC_FILE
        spec_path.write_text(dump_spec(parse_spec(run.spec, f"experiment {run.experiment_id}")))
        job_id = submission_id(run.experiment_id, run.attempt)
        entrypoint = shlex.join([self.python, "-m", "workers.runner", str(spec_path), "--out", str(run_dir),
                                 "--name-prefix", run.experiment_id])
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env={"env_vars": self._env()},
                                   metadata={"experiment_id": run.experiment_id, "attempt": str(run.attempt)})
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
            log.info("job %s was already submitted; adopting it", job_id)
        handle: Handle = {"executor": self.name, "submission_id": job_id, "address": self.address,
                          "run_dir": str(run_dir), "attempt": run.attempt}
        write_text_atomic(run_dir / HANDLE_FILE, json.dumps(handle))
        log.info("submitted experiment %s attempt %d as Ray job %s", run.experiment_id, run.attempt, job_id)
        return handle

    def _env(self) -> dict[str, str]:
        env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(int(self.stop_wait_s))}
        if (PROJECT_ROOT / "igat_core").is_dir():  # a source checkout: make `-m workers.runner` importable anywhere
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        if self.data_root is not None:
            env["IGAT_DATA_ROOT"] = str(Path(self.data_root).resolve())
        env.update(self.env)
        return env

    def _status(self, handle: Handle) -> tuple[str | None, int | None]:
        """(Ray job status, driver exit code); status None when the cluster does not know the job."""
        try:
            info = self.client.get_job_info(handle["submission_id"])
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None, None
            raise
        return str(info.status.value if hasattr(info.status, "value") else info.status), info.driver_exit_code

    def poll(self, handle: Handle) -> RunState:
        status, driver_exit_code = self._status(handle)
        self._tail_logs(handle)
        if status is None:
            return RunState(running=False, exit_code=None)
        if status in RUNNING_STATES:
            return RunState(running=True)
        return RunState(running=False, exit_code=exit_code_of(status, driver_exit_code))

    def _tail_logs(self, handle: Handle) -> None:
        """Mirror the job's log to RUN_DIR/job.log and append its new lines to events.jsonl as `log` events."""
        run_dir = Path(handle["run_dir"])
        mirror = run_dir / JOB_LOG
        try:
            text = self.client.get_job_logs(handle["submission_id"])
        except RuntimeError:
            return
        seen = mirror.stat().st_size if mirror.exists() else 0
        data = text.encode("utf-8", errors="replace")
        if len(data) <= seen:
            return
        new = data[seen:]
        end = new.rfind(b"\n")
        if end < 0:
            return
        new = new[: end + 1]
        with open(mirror, "ab") as f:
            f.write(new)
        text = ANSI.sub("", new.decode("utf-8", errors="replace"))
        lines = [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        shown = lines[-MAX_LOG_EVENTS_PER_POLL:]
        skipped = [f"({len(lines) - len(shown)} earlier line(s) in {JOB_LOG})"] if len(lines) > len(shown) else []
        run_log = RunLog(run_dir)
        for message in [*skipped, *(line[:2000] for line in shown)]:
            run_log.event("job", "log", message)

    # ------------------------------------------------------------------------------------------ cancel / clean

    def cancel(self, handle: Handle, *, force: bool = False) -> None:
        """stop_job: SIGTERM to the runner's process group, SIGKILL after stop_wait_s (re-sent when forced)."""
        try:
            self.client.stop_job(handle["submission_id"])
        except RuntimeError as exc:
            log.warning("stop_job %s: %s", handle["submission_id"], exc)

    def release(self, handle: Handle) -> None:
        self._tail_logs(handle)

    # ---------------------------------------------------------------------------------------------- recovery

    def attach(self, handle: Handle) -> bool:
        if "submission_id" not in handle:
            return False
        status, _ = self._status(handle)
        return status in RUNNING_STATES

    def find(self, run_dir: Path) -> Handle | None:
        handle = read_json(run_dir / HANDLE_FILE)
        return handle if isinstance(handle, dict) and "submission_id" in handle else None

    def error_tail(self, handle: Handle, max_chars: int = 4000) -> str:
        try:
            text = self.client.get_job_logs(handle["submission_id"])
        except RuntimeError:
            mirror = Path(handle["run_dir"]) / JOB_LOG
            text = mirror.read_text(errors="replace") if mirror.exists() else ""
        lines = [line.rsplit("\r", 1)[-1] for line in ANSI.sub("", text).splitlines()]
        return "\n".join(line for line in lines if line.strip()).strip()[-max_chars:]
