"""The `igat` console script, and its service commands: ``igat serve``, ``igat migrate`` and the thin REST client
(``igat submit / status / results / cancel``). ``igat submit`` takes an experiment spec or a study spec (a YAML
with a top-level ``experiment``, as ``igat study`` reads); ``status``, ``results`` and ``cancel`` take the id of
either.

`igat_app()` composes `igat`: igat_core's core commands (run, eval, theory; ``igat_core.cli``) with the ones
`register(app)` adds here. It is built on the service side, where both layers are visible, so igat_core never
imports the service; ``python -m service`` is the same program. Heavy imports (uvicorn, SQLAlchemy, the app,
torch) happen inside the commands.

Client configuration: ``IGAT_API_URL`` (default http://127.0.0.1:8000) and ``IGAT_API_TOKEN``; without the
latter the client reads the token file that ``igat serve`` writes (``IGAT_TOKEN_FILE``, default
``./var/api-token``) when it has to generate a token.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from igat_core.rundir import RESULTS_FILE

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_TOKEN_FILE = Path("var") / "api-token"
TERMINAL = ("succeeded", "failed", "cancelled")
#: top-level keys of a study spec that no experiment spec has
STUDY_KEYS = ("experiment", "variants", "grid", "arms")


def _token_file() -> Path:
    return Path(os.environ.get("IGAT_TOKEN_FILE", str(DEFAULT_TOKEN_FILE)))


# -------------------------------------------------------------------------------------------------- serve


def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    executor: Annotated[str | None, typer.Option(help="how experiments run: ray (default, or IGAT_EXECUTOR) | local")
                        ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn and dispatcher log level")] = "info",
    ray_cpus: Annotated[int | None, typer.Option(help="logical CPUs of the local Ray head (default: all)")] = None,
) -> None:
    """Run the API, a dispatcher and (executor ray, no IGAT_RAY_ADDRESS) a local Ray head with its dashboard.

    SQLite and ./var unless IGAT_* say otherwise. IGAT_RAY_ADDRESS (a Ray dashboard URL) points the ray
    executor at an existing cluster instead of starting one.
    """
    executor = executor or os.environ.get("IGAT_EXECUTOR") or "ray"
    if executor not in ("local", "ray"):
        _fail(f"unknown executor {executor!r}; choose local or ray", code=2)

    import uvicorn

    from service.app import create_app
    from service.db import migrate
    from service.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    if settings.api_token is None or not settings.api_token.get_secret_value():
        token = _generated_token()
        os.environ["IGAT_API_TOKEN"] = token
        get_settings.cache_clear()
        settings = get_settings()
    Path(settings.artifact_root).mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    typer.echo(f"igat serve: database {_redact(settings.database_url)}, artifacts in {settings.artifact_root}")

    # SIGTERM becomes an exit through the finally blocks (uvicorn re-raises it after its own shutdown), so a
    # half-started or running Ray head and the dispatcher are stopped too
    signal.signal(signal.SIGTERM, _exit_on_signal)
    head = _start_ray(settings, ray_cpus) if executor == "ray" else None
    try:
        supervisor = _DispatcherSupervisor(executor, log_level)
        supervisor.start()
        try:
            uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower())
        finally:
            supervisor.stop()
    finally:
        if head is not None:
            typer.echo("igat serve: stopping the local Ray head")
            head.stop()
            (Path(settings.artifact_root).parent / "ray-head.pid").unlink(missing_ok=True)


def migrate(
    revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to")] = "head",
) -> None:
    """Bring the database of IGAT_DATABASE_URL up to date (run once before the API and dispatchers start)."""
    from sqlalchemy.exc import OperationalError

    from service.db import migrate as upgrade
    from service.settings import get_settings

    url = get_settings().database_url
    try:
        upgrade(url, revision)
    except OperationalError as exc:
        _fail(f"igat migrate: cannot reach the database {_redact(url)}: {exc.orig}")
    typer.echo(f"igat migrate: {_redact(url)} is at revision {revision}")


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def _start_ray(settings: Any, num_cpus: int | None) -> Any:
    """The local Ray head (None when IGAT_RAY_ADDRESS names a cluster); the dispatcher inherits its address."""
    if settings.ray_address:
        typer.echo(f"igat serve: Ray cluster {settings.ray_address} (IGAT_RAY_ADDRESS)")
        return None
    from workers.ray_cluster import ray_auth_mode, start_local_head

    log_path = Path(settings.artifact_root).parent / "ray-head.log"
    try:
        head = start_local_head(num_cpus=num_cpus, log_path=log_path)
    except RuntimeError as exc:
        _fail(f"igat serve: could not start a local Ray head: {exc}")
    os.environ["IGAT_RAY_ADDRESS"] = head.dashboard_url
    os.environ["RAY_AUTH_MODE"] = ray_auth_mode()  # the dispatcher's Ray clients match the head
    if settings.max_concurrent_cpus is None:
        os.environ["IGAT_MAX_CONCURRENT_CPUS"] = str(num_cpus or os.cpu_count() or 1)
    (log_path.parent / "ray-head.pid").write_text(f"{head.process.pid}\n")
    typer.echo(f"igat serve: local Ray head up at {head.gcs_address}, dashboard {head.dashboard_url} "
               f"(log {log_path}, Ray temp dir {head.temp_dir})")
    return head


def _generated_token() -> str:
    """A fresh token, written (0600) where the local client looks for it."""
    path = _token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    typer.echo(f"igat serve: IGAT_API_TOKEN is not set; generated one in {path} (the igat client reads it there)")
    return token


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class _DispatcherSupervisor:
    """Keeps one ``python -m service.dispatcher`` child alive next to the API, and stops it on exit."""

    def __init__(self, executor: str, log_level: str):
        self.command = [
            sys.executable, "-m", "service.dispatcher", "--executor", executor,
            "--parent-pid", str(os.getpid()), "--log-level", log_level.upper(),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dispatcher-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen(self.command, env=dict(os.environ))

    def _watch(self) -> None:
        restarts = 0
        while not self._stopping.wait(1.0):
            assert self.process is not None
            code = self.process.poll()
            if code is None:
                continue
            if restarts >= 5:
                typer.echo(f"igat serve: the dispatcher keeps exiting (code {code}); not restarting it", err=True)
                return
            restarts += 1
            typer.echo(f"igat serve: the dispatcher exited with code {code}; restarting it", err=True)
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------------------- client


def _api_url() -> str:
    return os.environ.get("IGAT_API_URL", DEFAULT_API_URL).rstrip("/")


def _token() -> str | None:
    token = os.environ.get("IGAT_API_TOKEN")
    if token:
        return token
    try:
        return _token_file().read_text().strip() or None
    except OSError:
        return None


def _client(timeout: float | None = 30.0):
    import httpx

    headers = {"Accept": "application/json"}
    token = _token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=_api_url(), headers=headers, timeout=timeout)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _send(method: str, path: str, **kwargs: Any):
    import httpx

    try:
        with _client() as client:
            return client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        _fail(f"cannot reach the igat service at {_api_url()} ({exc}); is `igat serve` running?")


def _checked(response) -> Any:
    if response.status_code >= 400:
        _fail(f"error {response.status_code}: {_error_text(response)}")
    return response.json()


def _request(method: str, path: str, **kwargs: Any) -> Any:
    return _checked(_send(method, path, **kwargs))


def _either(method: str, identifier: str, experiment_path: str, study_path: str) -> tuple[str, Any]:
    """("experiment" | "study", body): the experiment with this id, else the study (ids are distinct UUIDs)."""
    response = _send(method, experiment_path.format(id=identifier))
    if response.status_code != 404:
        return "experiment", _checked(response)
    studied = _send(method, study_path.format(id=identifier))
    return "study", _checked(studied if studied.status_code != 404 else response)


def _error_text(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        if "message" in body:
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, list):
            return "; ".join(f"{d.get('field', d.get('loc'))}: {d.get('msg')}" for d in detail if isinstance(d, dict))
        if detail is not None:
            return str(detail)
    return json.dumps(body)


def submit(
    spec_path: Annotated[Path, typer.Argument(help="experiment or study spec (YAML)", exists=True, dir_okay=False)],
    wait: Annotated[bool, typer.Option("--wait", help="follow progress until it finishes (a study: then print its "
                                       "tables)")] = False,
    priority: Annotated[int, typer.Option(help="higher runs first")] = 0,
    idempotency_key: Annotated[str | None, typer.Option(help="resubmitting with the same key is a no-op")] = None,
) -> None:
    """Submit a spec to the service; prints the experiment's (or the study's) id."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    if is_study_file(spec_path):
        submit_study(spec_path, wait=wait, priority=priority, headers=headers)
        return
    from igat_core.spec import SpecError, load_spec

    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        _fail(str(exc), code=2)
    experiment = _request(
        "POST", "/experiments", json=spec.model_dump(mode="json"), params={"priority": priority}, headers=headers
    )
    typer.echo(f"{experiment['id']} {experiment['status']}")
    if wait:
        final = follow(experiment["id"])
        if final != "succeeded":
            detail = _request("GET", f"/experiments/{experiment['id']}")
            _fail(f"experiment {experiment['id']} {final}" + (f": {detail['error']}" if detail.get("error") else ""))
        typer.echo(f"succeeded; results: igat results {experiment['id']}")


def is_study_file(path: Path) -> bool:
    """A YAML mapping with a study's keys (`experiment`, `grid`, ...); anything unreadable is left to load_spec."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and any(key in data for key in STUDY_KEYS)


def submit_study(path: Path, *, wait: bool, priority: int, headers: dict[str, str]) -> None:
    """POST /studies; with ``wait``, follow its runs, then print its tables (exit 1 unless every run succeeded)."""
    from igat_core.spec import SpecError
    from igat_core.study_spec import load_study

    try:
        study = load_study(path)
    except SpecError as exc:
        _fail(str(exc), code=2)
    created = _request("POST", "/studies", json=study.model_dump(mode="json"), params={"priority": priority},
                       headers=headers)
    typer.echo(f"{created['id']} {created['status']} (study {created['name']}, {created['runs']} runs)")
    if not wait:
        return
    final = follow_study(created["id"])
    typer.echo(study_summary(_request("GET", f"/studies/{created['id']}/results")))
    if final != "succeeded":
        _fail(f"study {created['id']} {final}; results: igat results {created['id']}")
    typer.echo(f"study succeeded; results: igat results {created['id']}")


def follow_study(study_id: str, poll_s: float | None = None) -> str:
    """Print each run's status changes until every run has finished; returns the study's status."""
    poll_s = poll_s if poll_s is not None else float(os.environ.get("IGAT_POLL_S", "2"))
    seen: dict[str, str] = {}
    while True:
        study = _request("GET", f"/studies/{study_id}")
        for run in study["experiments"]:
            if seen.get(run["id"]) != run["status"]:
                seen[run["id"]] = run["status"]
                done = sum(r["status"] in TERMINAL for r in study["experiments"])
                why = (run.get("error") or "").strip().splitlines()[-1:]
                typer.echo(f"[{done}/{study['runs']} finished] {run['name']}: {run['status']}"
                           + (f": {why[0]}" if why else ""))
        if study["status"] in TERMINAL:
            return study["status"]
        time.sleep(poll_s)


def study_summary(record: dict[str, Any]) -> str:
    """The study's report (runs, Tables 1-3) as text, without its plot links."""
    from igat_core.study_report import render_study_report

    lines = render_study_report(record).splitlines()
    return "\n".join(line for line in lines if not line.startswith("!["))


def follow(experiment_id: str) -> str:
    """Draw the experiment's events as progress bars (igat_core.progress) until it finishes, reconnecting with
    Last-Event-ID; returns its status."""
    from igat_core.progress import ProgressBars

    bars = ProgressBars(sys.stdout)
    try:
        return _follow(experiment_id, bars)
    finally:
        bars.close()


def _follow(experiment_id: str, bars: Callable[[dict[str, Any]], None]) -> str:
    import httpx

    last: str | None = None
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last is not None:
            headers["Last-Event-ID"] = last
        try:
            with _client(timeout=None) as client, client.stream(
                "GET", f"/experiments/{experiment_id}/events", headers=headers
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _fail(f"error {response.status_code}: {_error_text(response)}")
                for event in parse_sse(response.iter_lines()):
                    failures = 0
                    if event.get("event") == "end":
                        return json.loads(event["data"])["status"]
                    if event.get("id"):
                        last = event["id"]
                    if "data" in event:
                        bars(json.loads(event["data"]))
        except httpx.TransportError as exc:
            failures += 1
            if failures > 10:
                _fail(f"lost the event stream of {experiment_id}: {exc}")
            time.sleep(min(2.0 * failures, 10.0))


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Events of a text/event-stream, as dicts of their fields (data lines joined by newlines)."""
    event: dict[str, str] = {}
    for line in lines:
        if line == "":
            if event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            event["data"] = f"{event['data']}\n{value}" if "data" in event else value
        elif name in ("id", "event", "retry"):
            event[name] = value
    if event:
        yield event


def status(
    experiment_id: Annotated[str | None, typer.Argument(help="experiment or study id; omit to list recent "
                                                        "studies and experiments")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
) -> None:
    """Show one experiment or study (each run's status), or list the most recent studies and experiments."""
    if experiment_id is None:
        _print_recent(as_json)
        return
    kind, e = _either("GET", experiment_id, "/experiments/{id}", "/studies/{id}")
    if as_json:
        typer.echo(json.dumps(e, indent=2))
        return
    if kind == "study":
        _print_study(e)
        return
    typer.echo(f"{e['id']}  {e['name']}\n  status:   {e['status']} (attempt {e['attempt']}, priority {e['priority']})")
    for key in ("created_at", "started_at", "finished_at"):
        if e.get(key):
            typer.echo(f"  {key.replace('_at', ''):<9} {e[key]}")
    if e.get("error"):
        typer.echo(f"  error:    {e['error']}")


def _print_recent(as_json: bool) -> None:
    studies = _request("GET", "/studies", params={"limit": 10})
    page = _request("GET", "/experiments", params={"limit": 20})
    if as_json:
        typer.echo(json.dumps({"studies": studies, "experiments": page}, indent=2))
        return
    for s in studies["items"]:
        typer.echo(f"{s['id']}  {s['status']:<10} study {s['name']}  ({s['progress']:.0%} of {s['runs']} runs "
                   f"finished; created {s['created_at'][:19]})")
    if studies["total"]:
        typer.echo(f"{len(studies['items'])} of {studies['total']} studies")
    for e in page["items"]:
        typer.echo(f"{e['id']}  {e['status']:<10} {e['name']}  (created {e['created_at'][:19]})")
    typer.echo(f"{len(page['items'])} of {page['total']} experiment(s)")


def _print_study(s: dict[str, Any]) -> None:
    counts = ", ".join(f"{n} {status}" for status, n in s["counts"].items() if n)
    typer.echo(f"{s['id']}  study {s['name']}\n  status:   {s['status']} ({s['progress']:.0%} of {s['runs']} runs "
               f"finished: {counts})")
    for run in s["experiments"]:
        waits = f" (base from {run['base_of']})" if run.get("base_of") else ""
        typer.echo(f"  {run['id']}  {run['status']:<10} {run['name']}{waits}")


def results(
    experiment_id: Annotated[str, typer.Argument(help="experiment or study id")],
    out: Annotated[Path | None, typer.Option(help=f"write {RESULTS_FILE} here instead of printing it")] = None,
    into: Annotated[Path | None, typer.Option(
        help="a study: write here what `igat study --out DIR` writes, without checkpoints (the study, its "
             "results and report, and each succeeded run's results)")] = None,
) -> None:
    """Print (or save) the results.json of a succeeded experiment, or a study's (as far as its runs have got)."""
    kind, content = _either("GET", experiment_id, "/results/{id}", "/studies/{id}/results")
    if into is not None:
        if kind != "study":
            _fail(f"--into: {experiment_id} is an experiment, not a study; use --out", code=2)
        _write_study_dir(_request("GET", f"/studies/{experiment_id}"), content, into)
        typer.echo(f"wrote {into}")
        return
    text = json.dumps(content, indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        typer.echo(f"wrote {out}")


def _write_study_dir(detail: dict[str, Any], record: dict[str, Any], into: Path) -> None:
    """The layout of `igat study --out INTO` from the service's study, its results and its runs' results."""
    from igat_core.rundir import STUDY_FILE, study_run_dir, write_json_atomic
    from igat_core.study_report import write_study_report
    from igat_core.study_spec import parse_study, plan_record, plan_study

    study = parse_study(detail["spec"])
    into.mkdir(parents=True, exist_ok=True)
    write_json_atomic(into / STUDY_FILE, plan_record(study, plan_study(study)))
    for run in detail["experiments"]:
        if run["status"] == "succeeded":
            write_json_atomic(study_run_dir(into, run["name"]) / RESULTS_FILE,
                              _request("GET", f"/results/{run['id']}"))
    write_json_atomic(into / RESULTS_FILE, record)
    write_study_report(record, into)


def cancel(experiment_id: Annotated[str, typer.Argument(help="experiment or study id")]) -> None:
    """Cancel a queued or running experiment, or every unfinished run of a study."""
    _, e = _either("POST", experiment_id, "/experiments/{id}/cancel", "/studies/{id}/cancel")
    typer.echo(f"{e['id']} {e['status']}")


def register(app: typer.Typer) -> None:
    """Add serve / migrate / submit / status / results / cancel to ``app``."""
    app.command("serve")(serve)
    app.command("migrate")(migrate)
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("results")(results)
    app.command("cancel")(cancel)


def igat_app() -> typer.Typer:
    """`igat`: the core commands of ``igat_core.cli`` and the service commands of `register`."""
    from igat_core.cli import app as core_app

    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help=core_app.info.help)
    service_commands = typer.Typer()
    register(service_commands)
    app.add_typer(core_app)
    app.add_typer(service_commands)
    return app


def main() -> None:
    """The ``igat`` console script (pyproject.toml's entry point)."""
    igat_app()(prog_name="igat")
