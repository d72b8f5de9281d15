"""A local Ray head for `igat serve` and the tests: `ray start --head --block` in its own process group.

Every port is picked free (GCS, dashboard, client server, agents), so it never collides with another Ray on the
same machine, and stopping it touches only the processes it started: SIGTERM to the blocking `ray start`, which
shuts its node down, then SIGKILL to whatever is left of its process group. It also forgets the head in Ray's
address file (`ray_current_cluster`, which a plain `ray.init()` follows) when the file still names it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


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


def ray_address_file() -> Path:
    """Where `ray start` records the newest head for `ray.init()` without an address (Ray's temp-dir rule)."""
    linux_tmp = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    system_tmp = os.environ.get("RAY_TMPDIR") or linux_tmp or "/tmp"
    return Path(system_tmp) / "ray" / "ray_current_cluster"


@dataclass
class LocalRayHead:
    process: subprocess.Popen[bytes]
    gcs_address: str
    dashboard_url: str
    log_path: Path | None

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
        self.forget_address()

    def forget_address(self) -> None:
        if recorded_head_port() == self.gcs_address.rsplit(":", 1)[1]:
            ray_address_file().unlink(missing_ok=True)


def recorded_head_port() -> str | None:
    """The GCS port of the head in Ray's address file, if there is one."""
    try:
        return ray_address_file().read_text().strip().rsplit(":", 1)[-1]
    except OSError:
        return None


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
    """Start a single-node Ray cluster with its dashboard (and Jobs API) on 127.0.0.1; wait until it answers."""
    (port, dashboard_port, client_port, agent_http_port, agent_grpc_port, runtime_env_port, metrics_port,
     node_manager_port, object_manager_port) = free_ports(9)
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
        f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
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
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    finally:
        if log_path is not None:
            out.close()  # type: ignore[union-attr]
    head = LocalRayHead(process, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", log_path)
    deadline = time.monotonic() + timeout
    try:
        while not dashboard_ready(head.dashboard_url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:] if log_path is not None and log_path.exists() else ""
                raise RuntimeError(f"the local Ray head did not come up (exit code {process.poll()})\n{tail}")
            time.sleep(0.5)
    except BaseException:  # a failed start, or SIGTERM / Ctrl-C while waiting: the head must not outlive us
        head.stop(timeout=10)
        raise
    return head
