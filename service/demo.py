"""``python -m service.demo`` (``make demo``): the quickstart through the service, start to finish.

Starts ``igat serve`` (API, dispatcher and a local Ray head with its dashboard; SQLite and artifacts under
./var), submits examples/quickstart.yaml, prints its progress as it streams in, prints the results table, and
stops the server and Ray. The server and Ray are stopped even when a step fails or the demo is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from igat_core.rundir import RESULTS_FILE, run_dir_of

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Server:
    """`python -m service serve` in its own process group, logging to var/demo-serve.log."""

    def __init__(self, var: Path, port: int, token: str, executor: str):
        self.var = var
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = var / "demo-serve.log"
        env = {**os.environ, "IGAT_API_TOKEN": token, "IGAT_DATABASE_URL": f"sqlite:///{var / 'igat.db'}",
               "IGAT_ARTIFACT_ROOT": str(var / "artifacts"), "IGAT_EXECUTOR": executor,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)], cwd=ROOT,
                                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"igat serve exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"igat serve did not answer within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (serve stops its dispatcher and its Ray head), then SIGKILL for anything left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self.process.pid)
        if self.process.poll() is None:
            self.process.wait()
        head_pid = self.var / "ray-head.pid"
        if head_pid.exists():
            pid = int(head_pid.read_text().strip() or 0)
            if pid:
                _kill_group(pid)
            head_pid.unlink(missing_ok=True)


def stream(client, experiment_id: str) -> str:
    """Draw the experiment's events as progress bars (igat_core.progress; Ray's own log lines left out) until it
    ends; returns its final status."""
    from igat_core.progress import ProgressBars

    bars = ProgressBars(sys.stdout)
    try:
        return _stream(client, experiment_id, bars)
    finally:
        bars.close()


def _stream(client, experiment_id: str, bars) -> str:
    from service.cli import parse_sse

    last: str | None = None
    while True:
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
        try:
            with client.stream("GET", f"/experiments/{experiment_id}/events", headers=headers,
                               timeout=None) as response:
                for event in parse_sse(response.iter_lines()):
                    if event.get("event") == "end":
                        return json.loads(event["data"])["status"]
                    last = event.get("id", last)
                    if "data" in event:
                        bars(json.loads(event["data"]))
        except Exception as exc:  # a dropped stream: reconnect from the last event
            bars.write(f"(event stream interrupted: {exc}; reconnecting)")
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "examples" / "quickstart.yaml")
    parser.add_argument("--var", type=Path, default=Path("var"), help="database, artifacts and logs")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    args = parser.parse_args(argv)

    import httpx

    from igat_core.report import accuracy_table, comparison_text
    from igat_core.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    var = args.var.resolve()
    var.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    started = time.monotonic()
    print(f"igat demo: starting igat serve ({args.executor} executor; log {var / 'demo-serve.log'})", flush=True)
    server = Server(var, _free_port(), token, args.executor)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.wait_healthy(timeout=300)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
            r = client.post("/experiments", json=spec.model_dump(mode="json"))
            if r.status_code != 202:
                print(f"igat demo: submit failed ({r.status_code}): {r.text}", file=sys.stderr)
                return 1
            experiment_id = r.json()["id"]
            print(f"igat demo: submitted {args.spec.name} as experiment {experiment_id}", flush=True)
            status = stream(client, experiment_id)
            if status != "succeeded":
                error = client.get(f"/experiments/{experiment_id}").json().get("error")
                print(f"igat demo: experiment {experiment_id} {status}: {error}", file=sys.stderr)
                return 1
            results = client.get(f"/results/{experiment_id}").json()
        evaluation = results["evaluation"]
        print(f"\n{spec.name}: accuracy (%) on {evaluation['n_examples']} test examples, "
              f"eps {evaluation['eps'] * 255:.2f}/255\n")
        print(accuracy_table(results))
        comparisons = comparison_text(results)
        if comparisons:
            print("\n" + comparisons)
        print(f"\nigat demo: done in {time.monotonic() - started:.0f}s; results in "
              f"{run_dir_of(var / 'artifacts', experiment_id) / RESULTS_FILE}")
        return 0
    except KeyboardInterrupt:
        print("igat demo: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"igat demo: {exc}", file=sys.stderr)
        return 1
    finally:
        print("igat demo: stopping igat serve and Ray", flush=True)
        server.stop()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
