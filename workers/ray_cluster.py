"""A local Ray head for `igat serve` and the tests: `ray start --head --block` in its own process group.

Every port is picked free (GCS, dashboard, client server, agents) and the head has a Ray temp dir of its own, so
it never collides with another Ray on the same machine. The temp dir matters beyond tidiness: Ray's job
supervisor gives every job driver the RAY_ADDRESS it reads from the address file of its node's temp dir
(`ray_current_cluster`), which in the shared /tmp/ray names whichever head started last on the machine.

Stopping touches only the processes this head started: SIGTERM to the blocking `ray start`, which shuts its node
down, then SIGKILL to whatever is left of its process group and to any process that names its temp dir. A
SIGTERM or Ctrl-C that arrives while `ray start` is being spawned is held until the head can be stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (all sockets held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def system_tmp() -> Path:
    """The directory Ray puts its default temp dir `ray/` in (Ray's rule: RAY_TMPDIR, TMPDIR on Linux, /tmp)."""
    linux_tmp = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    return Path(os.environ.get("RAY_TMPDIR") or linux_tmp or "/tmp")


def ray_address_file(temp_dir: Path | None = None) -> Path:
    """Where `ray start` records its GCS address: in `temp_dir`, by default the machine's shared `ray/`."""
    return (temp_dir if temp_dir is not None else system_tmp() / "ray") / "ray_current_cluster"


def recorded_head_port(temp_dir: Path | None = None) -> str | None:
    """The GCS port of the head in the address file of `temp_dir`, if there is one."""
    try:
        return ray_address_file(temp_dir).read_text().strip().rsplit(":", 1)[-1]
    except OSError:
        return None


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text` (Linux /proc; empty elsewhere)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in pids if pid != os.getpid()]


@contextmanager
def signals_held() -> Iterator[list[int]]:
    """SIGTERM and SIGINT that arrive inside the block are recorded, not handled; `release_signals` hands them
    to their handlers once the caller can clean up what the block started. In other threads (where Python
    handles no signals) the block holds nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
                for signum in HELD_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def release_signals(received: list[int]) -> None:
    for signum in dict.fromkeys(received):
        signal.raise_signal(signum)


@dataclass
class LocalRayHead:
    process: subprocess.Popen[bytes]
    gcs_address: str
    dashboard_url: str
    log_path: Path | None
    temp_dir: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the node down (processes of this head only): Ray drains for up to `timeout` s, then SIGKILL."""
        pgid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait()
        for pid in processes_naming(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def ray_auth_mode() -> str:
    """RAY_AUTH_MODE when set, else "disabled": Ray's own default for `ray start` would turn token authentication
    on whenever some earlier plain `ray.init()` left a token in ~/.ray, so the same command would start differently
    configured heads on different machines."""
    return os.environ.get("RAY_AUTH_MODE") or "disabled"


def dashboard_ready(url: str) -> bool:
    """The dashboard answers: 200, or 401/403 when the head runs with token authentication."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_local_head(*, num_cpus: int | None = None, num_gpus: int | None = None, log_path: Path | None = None,
                     object_store_bytes: int | None = None, timeout: float = 120.0) -> LocalRayHead:
    """Start a single-node Ray cluster with its dashboard (and Jobs API) on 127.0.0.1; wait until it answers.
    Its temp dir (short: Ray's socket paths must fit in 107 bytes) is kept after stop, as Ray keeps /tmp/ray."""
    (port, dashboard_port, client_port, agent_http_port, agent_grpc_port, runtime_env_port, metrics_port,
     node_manager_port, object_manager_port) = free_ports(9)
    temp_dir = Path(tempfile.mkdtemp(prefix="igat-ray-", dir=system_tmp()))
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_http_port}", f"--dashboard-agent-grpc-port={agent_grpc_port}",
        f"--runtime-env-agent-port={runtime_env_port}", f"--metrics-export-port={metrics_port}",
        f"--node-manager-port={node_manager_port}", f"--object-manager-port={object_manager_port}",
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    if object_store_bytes is not None:
        command.append(f"--object-store-memory={object_store_bytes}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": ray_auth_mode()}
    env.pop("RAY_ADDRESS", None)
    head = None
    deadline = time.monotonic() + timeout
    try:
        with signals_held() as received:
            process = spawn(command, env, log_path)
            head = LocalRayHead(process, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", log_path,
                                temp_dir)
        release_signals(received)
        while not dashboard_ready(head.dashboard_url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:] if log_path is not None and log_path.exists() else ""
                raise RuntimeError(f"the local Ray head did not come up (exit code {process.poll()})\n{tail}")
            time.sleep(0.5)
    except BaseException:  # a failed start, or SIGTERM / Ctrl-C while starting: the head must not outlive us
        if head is not None:
            head.stop(timeout=10)
        raise
    return head


def spawn(command: list[str], env: dict[str, str], log_path: Path | None) -> subprocess.Popen[bytes]:
    """`command` in a session of its own, its output appended to `log_path`."""
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
