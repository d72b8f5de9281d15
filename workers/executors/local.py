"""Run each experiment as a local subprocess: ``<runner_command> RUN_DIR/spec.yaml --out RUN_DIR``.

The runner gets its own session and process group (``start_new_session``), so cancelling kills everything it
spawned (data-loader workers included) and a dispatcher that dies does not take the run with it: the next
dispatcher re-attaches by pid, checking the process start time so a recycled pid is never mistaken for it.
stdout and stderr go to ``stdout.log`` / ``stderr.log`` in the run directory (appended per attempt), and the
handle is also written to ``executor.json`` there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

from igat_core.rundir import HANDLE_FILE, SPEC_FILE, STDERR_LOG, STDOUT_LOG, read_json, write_text_atomic
from workers.executors import ExperimentRun, Handle, RunState
from workers.executors.processes import alive, group_members, start_time

log = logging.getLogger(__name__)

ATTEMPT_MARK = "=== igat dispatcher: attempt "
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class LocalProcessExecutor:
    name = "local"

    def __init__(self, runner_command: list[str], *, data_root: Path | None = None, env: dict[str, str] | None = None):
        if not runner_command:
            raise ValueError("runner_command is empty")
        self.runner_command = list(runner_command)
        self.data_root = data_root
        self.extra_env = dict(env or {})
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -------------------------------------------------------------------------------------------- start / poll

    def start(self, run: ExperimentRun) -> Handle:
        from igat_core.spec import dump_spec, parse_spec

        run_dir = run.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path = run_dir / SPEC_FILE
        spec_path.write_text(dump_spec(parse_spec(run.spec, f"experiment {run.experiment_id}")))
        command = [*self.runner_command, str(spec_path), "--out", str(run_dir)]
        mark = f"{ATTEMPT_MARK}{run.attempt}: {' '.join(command)}\n".encode()
        with open(run_dir / STDOUT_LOG, "ab") as out, open(run_dir / STDERR_LOG, "ab") as err:
            out.write(mark)
            err.write(mark)
            out.flush()
            err.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self._env(),
                start_new_session=True,
                close_fds=True,
            )
        self._children[process.pid] = process
        handle: Handle = {
            "executor": self.name,
            "host": socket.gethostname(),
            "pid": process.pid,
            "pgid": process.pid,
            "start_time": start_time(process.pid),
            "run_dir": str(run_dir),
            "attempt": run.attempt,
        }
        write_text_atomic(run_dir / HANDLE_FILE, json.dumps(handle))
        log.info("started experiment %s attempt %d: pid %d", run.experiment_id, run.attempt, process.pid)
        return handle

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if self.data_root is not None:
            env["IGAT_DATA_ROOT"] = str(self.data_root)
        if (PROJECT_ROOT / "igat_core").is_dir():  # a source checkout: make `-m igat_core.cli` importable anywhere
            parts = [str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        env.update(self.extra_env)
        return env

    def poll(self, handle: Handle) -> RunState:
        pid = int(handle["pid"])
        child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return RunState(running=True)
            return RunState(running=False, exit_code=code)
        return RunState(running=alive(pid, handle.get("start_time")))

    # ------------------------------------------------------------------------------------------ cancel / clean

    def cancel(self, handle: Handle, *, force: bool = False) -> None:
        pgid = int(handle.get("pgid") or handle["pid"])
        sig = signal.SIGKILL if force else signal.SIGTERM
        if not self._owns_group(handle):
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def release(self, handle: Handle) -> None:
        pid = int(handle["pid"])
        child = self._children.pop(pid, None)
        if child is not None and child.poll() is None:  # pragma: no cover - release is called after the exit
            child.kill()
            child.wait()
        if group_members(int(handle.get("pgid") or pid)):
            log.info("killing leftover processes of group %s", handle.get("pgid"))
            self.cancel(handle, force=True)

    def _owns_group(self, handle: Handle) -> bool:
        pid = int(handle["pid"])
        if pid in self._children:
            return True
        return alive(pid, handle.get("start_time")) or bool(group_members(int(handle.get("pgid") or pid)))

    # ---------------------------------------------------------------------------------------------- recovery

    def attach(self, handle: Handle) -> bool:
        if handle.get("host", socket.gethostname()) != socket.gethostname():
            log.warning("run %s was started on host %s; the local executor cannot see it", handle, handle.get("host"))
            return False
        return alive(int(handle["pid"]), handle.get("start_time"))

    def find(self, run_dir: Path) -> Handle | None:
        handle = read_json(run_dir / HANDLE_FILE)
        return handle if isinstance(handle, dict) and "pid" in handle else None

    def error_tail(self, handle: Handle, max_chars: int = 4000) -> str:
        path = Path(handle["run_dir"]) / STDERR_LOG
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        cut = text.rfind(ATTEMPT_MARK)
        if cut >= 0:
            text = text[text.find("\n", cut) + 1 :]
        # progress bars redraw with carriage returns: keep what each line finally showed
        lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
        text = "\n".join(line for line in lines if line.strip()).strip()
        return text[-max_chars:]

