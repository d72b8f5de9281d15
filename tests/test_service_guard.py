"""Bounded requests and the token (issue 16, points 2, 5 and 6 of the API): the body limit, the token checked
before a body is read, the 422 cap, deep nesting, reads behind the token where deployed, artifact names and
media types, and a spec's validation kept off the event loop.

The ASGI tests drive the real app with their own ``receive``, so that they see exactly how much of a body the
app took; the served test runs uvicorn in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from service import store
from service.db import session_scope
from service.models import RUNNING

try:
    from tests.service_fixtures import AUTH, ROOT, TOKEN, create_schema, fake_spec, free_port, make_client
    from tests.service_fixtures import make_settings, settings_env, sqlite_url, wait_for  # noqa: F401
except ImportError:
    from service_fixtures import AUTH, ROOT, TOKEN, create_schema, fake_spec, free_port, make_client
    from service_fixtures import make_settings, settings_env, sqlite_url, wait_for  # noqa: F401

MiB = 1 << 20


@pytest.fixture
def sessions(sqlite_url):
    from service.db import make_session_factory

    engine = create_schema(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def app_for(tmp_path: Path, url: str, sessions, **overrides: Any):
    from service.app import create_app

    return create_app(make_settings(tmp_path, url, **overrides), session_factory=sessions)


class Upload:
    """An ASGI ``receive`` that hands the app ``chunks`` one by one and counts what it took."""

    def __init__(self, chunks: list[bytes]):
        self.chunks, self.taken = list(chunks), 0

    async def __call__(self) -> dict[str, Any]:
        if not self.chunks:
            return {"type": "http.disconnect"}
        self.taken += 1
        chunk = self.chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}


async def asgi(app, method: str, path: str, headers: dict[str, str], receive) -> tuple[int, dict[str, str], bytes]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("testserver", 80), "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    answer: dict[str, Any] = {"body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


def chunks_of(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def unknown_keys(n: int) -> bytes:
    return json.dumps({f"unknown_{i:07d}": 1 for i in range(n)}).encode()


# ------------------------------------------------------------------------------------------- body limit


def test_an_announced_oversized_body_is_refused_before_a_byte_is_read(tmp_path, sqlite_url, sessions):
    app = app_for(tmp_path, sqlite_url, sessions)
    body = unknown_keys(700_000)  # 10.5 MB, the probe
    upload = Upload(chunks_of(body))
    headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(body))}
    status, answer_headers, answer = anyio.run(asgi, app, "POST", "/experiments", headers, upload)
    assert status == 413 and answer_headers["content-type"] == "application/json"
    assert "1048576 bytes" in json.loads(answer)["detail"] and "IGAT_MAX_BODY_BYTES" in json.loads(answer)["detail"]
    assert upload.taken == 0


def test_a_streamed_body_is_cut_off_at_the_limit(tmp_path, sqlite_url, sessions):
    app = app_for(tmp_path, sqlite_url, sessions, max_body_bytes=256 * 1024)
    upload = Upload(chunks_of(unknown_keys(700_000)))  # no Content-Length: chunked
    status, _, answer = anyio.run(asgi, app, "POST", "/experiments", {**AUTH, "Content-Type": "application/json"},
                                  upload)
    assert status == 413 and "262144 bytes" in json.loads(answer)["detail"]
    assert upload.taken == 256 // 64 + 1  # the chunk that passed the limit was the last one taken
    under = Upload(chunks_of(json.dumps(fake_spec("small")).encode(), 16))
    status, _, answer = anyio.run(asgi, app, "POST", "/experiments", {**AUTH, "Content-Type": "application/json"},
                                  under)
    assert status == 202, answer


def test_the_token_is_checked_before_the_body_is_read(tmp_path, sqlite_url, sessions):
    app = app_for(tmp_path, sqlite_url, sessions, max_body_bytes=64 * MiB)
    body = unknown_keys(700_000)
    for headers, expected in [({}, "missing"), ({"Authorization": "Bearer wrong"}, "invalid API token")]:
        for announced in (True, False):
            upload = Upload(chunks_of(body))
            sent = {**headers, "Content-Type": "application/json"}
            if announced:
                sent["Content-Length"] = str(len(body))
            status, answer_headers, answer = anyio.run(asgi, app, "POST", "/experiments", sent, upload)
            assert status == 401 and expected in json.loads(answer)["detail"]
            assert answer_headers["www-authenticate"] == "Bearer"
            assert upload.taken == 0


def test_healthz_answers_while_a_large_spec_validates(tmp_path, sqlite_url, sessions):
    """The spec is decoded and validated in a worker thread: once the app has the whole body, /healthz is served
    to the end while that validation still runs (it takes seconds; /healthz milliseconds)."""
    app = app_for(tmp_path, sqlite_url, sessions, max_body_bytes=16 * MiB)
    body = unknown_keys(200_000)
    finished: list[str] = []

    async def main() -> tuple[int, bytes]:
        body_taken = anyio.Event()
        upload = Upload([body])

        async def receive() -> dict[str, Any]:
            message = await upload()
            body_taken.set()
            return message

        async def post() -> None:
            result["post"] = await asgi(app, "POST", "/experiments", {**AUTH, "Content-Type": "application/json"},
                                        receive)
            finished.append("POST /experiments")

        result: dict[str, Any] = {}
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(post)
            await body_taken.wait()
            status, _, answer = await asgi(app, "GET", "/healthz", {}, Upload([b""]))
            finished.append("GET /healthz")
            assert status == 200 and json.loads(answer)["status"] == "ok"
        return result["post"][0], result["post"][2]

    status, answer = anyio.run(main)
    assert status == 422 and json.loads(answer)["omitted"] == 200_000 - 20
    assert finished == ["GET /healthz", "POST /experiments"]


def test_a_served_api_answers_healthz_during_an_upload_and_refuses_it_at_the_limit(tmp_path, sqlite_url):
    create_schema(sqlite_url).dispose()
    settings = make_settings(tmp_path, sqlite_url)
    port = free_port()
    log = tmp_path / "uvicorn.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port)],
        cwd=ROOT, env={**os.environ, **settings_env(settings)}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy(url, process, log), 60, interval=0.2, what="uvicorn to answer /healthz")
        healthz_answered = threading.Event()

        def body():  # 10 MB in chunks; half-way through the first MiB it waits for /healthz to have answered
            for i, chunk in enumerate(chunks_of(unknown_keys(700_000))):
                if i == 8:
                    assert healthz_answered.wait(60)
                yield chunk

        outcome: dict[str, Any] = {}

        def upload() -> None:
            try:
                outcome["response"] = httpx.post(url + "/experiments", content=body(), timeout=60,
                                                 headers={**AUTH, "Content-Type": "application/json"})
            except httpx.HTTPError as exc:  # the server may close the connection once it has answered
                outcome["error"] = exc

        uploader = threading.Thread(target=upload)
        uploader.start()
        assert httpx.get(url + "/healthz", timeout=30).json()["status"] == "ok"
        healthz_answered.set()
        uploader.join(90)
        assert not uploader.is_alive()
        response = outcome.get("response")
        assert response is not None, outcome
        assert response.status_code == 413 and "IGAT_MAX_BODY_BYTES" in response.json()["detail"]
        assert httpx.get(url + "/experiments", timeout=30).json()["total"] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _healthy(url: str, process: subprocess.Popen, log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"uvicorn exited early:\n{log.read_text()}")
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---------------------------------------------------------------------------------------------- 422 shape


def test_a_422_lists_the_first_twenty_problems_and_counts_the_rest(tmp_path, sqlite_url, sessions):
    with make_client(make_settings(tmp_path, sqlite_url), sessions) as client:
        r = client.post("/experiments", content=unknown_keys(5000),
                        headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422
        body = r.json()
        assert len(body["detail"]) == 20 and body["omitted"] == 4980
        assert body["detail"][0]["field"] == "unknown_0000000" and "Extra inputs" in body["detail"][0]["msg"]
        assert body["message"].endswith("(and 4980 more)")
        assert len(r.content) < 10_000
        few = client.post("/experiments", json={"name": "bad name!"}, headers=AUTH).json()
        assert few["omitted"] == 0 and [p["field"] for p in few["detail"]] == ["name"]


@pytest.mark.parametrize("route,prefix", [("/experiments", '{"base": {"params": {"k": '),
                                          ("/studies", '{"name": "s", "experiment": {"dataset": ')])
@pytest.mark.parametrize("depth", [40, 50_000])  # 50,000: deeper than json.loads itself can go
def test_deep_nesting_is_refused_naming_the_field(tmp_path, sqlite_url, sessions, route, prefix, depth):
    body = prefix + "[" * depth + "]" * depth + "}}" + ("}" if route == "/experiments" else "")
    with make_client(make_settings(tmp_path, sqlite_url), sessions) as client:
        r = client.post(route, content=body.encode(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    start = "base.params.k" if route == "/experiments" else "experiment.dataset"
    levels = 32 - 3 if route == "/experiments" else 32 - 2  # the containers above the first array
    assert problem["field"] == start + ".0" * levels and "deeper than 32 levels" in problem["msg"]
    assert problem["type"] == "too_deep"


# ------------------------------------------------------------------------------------------ reads, token


def _read_paths(client) -> list[str]:
    e = client.post("/experiments", json=fake_spec(), headers=AUTH).json()["id"]
    s = client.post("/studies", json={"name": "s", "experiment": fake_spec()}, headers=AUTH).json()["id"]
    return ["/experiments", f"/experiments/{e}", f"/experiments/{e}/events", f"/experiments/{e}/metrics",
            f"/results/{e}", f"/results/{e}/artifacts", f"/results/{e}/artifacts/executor.json", "/studies",
            f"/studies/{s}", f"/studies/{s}/results"]


def test_reads_need_the_token_where_deployed(tmp_path, sqlite_url, sessions):
    with make_client(make_settings(tmp_path, sqlite_url, open_reads=False), sessions) as client:
        paths = _read_paths(client)
        for path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = client.get(path, headers=headers)
                assert r.status_code == 401, (path, r.status_code)
                assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["detail"]
        for path in paths[:2] + paths[3:]:  # not the event stream, which stays open while the run is queued
            assert client.get(path, headers=AUTH).status_code in (200, 404, 409), path
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/openapi.json").status_code == 200


def test_reads_are_open_in_local_development_mode(tmp_path, sqlite_url, sessions):
    with make_client(make_settings(tmp_path, sqlite_url), sessions) as client:
        for path in _read_paths(client):
            if not path.endswith("/events"):
                assert client.get(path).status_code in (200, 404, 409), path
        assert client.post("/experiments", json=fake_spec()).status_code == 401


def test_deployed_reads_without_a_configured_token_fail_closed(tmp_path, sqlite_url, sessions):
    with make_client(make_settings(tmp_path, sqlite_url, open_reads=False, api_token=None), sessions) as client:
        r = client.get("/experiments", headers=AUTH)
        assert r.status_code == 503 and "IGAT_API_TOKEN" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200


# -------------------------------------------------------------------------------------------- artifacts


def _finished_run(client, sessions, run: Path) -> str:
    e = client.post("/experiments", json=fake_spec(), headers=AUTH).json()["id"]
    run.mkdir(parents=True)
    with session_scope(sessions) as s:
        store.transition(s, e, RUNNING, run_dir=str(run))
    return e


def test_long_artifact_names_are_refused_not_a_server_error(tmp_path, sqlite_url, sessions):
    with make_client(make_settings(tmp_path, sqlite_url), sessions, raise_server_exceptions=False) as client:
        e = _finished_run(client, sessions, tmp_path / "run")
        for path, expected in [("a" * 256, 400), ("a" * 5000, 400), ("d/" + "é" * 128, 400), ("a" * 255, 404),
                               ("/".join(["a" * 250] * 40), 404)]:
            r = client.get(f"/results/{e}/artifacts/{path}")
            assert r.status_code == expected, (path[:20], r.status_code, r.text[:200])
            assert r.json()["detail"]


def test_checkpoints_are_served_as_octet_stream(tmp_path, sqlite_url, sessions):
    run = tmp_path / "run"
    with make_client(make_settings(tmp_path, sqlite_url), sessions) as client:
        e = _finished_run(client, sessions, run)
        (run / "base.pt").write_bytes(b"PK\x03\x04 not really a zip")
        r = client.get(f"/results/{e}/artifacts/base.pt", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("attachment")


# -------------------------------------------------------------------------------------------------- OpenAPI


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_the_openapi_document_says_what_the_routes_do(tmp_path, sqlite_url, sessions):
    with make_client(make_settings(tmp_path, sqlite_url), sessions) as client:
        doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert not _keys(doc) & {"ge", "le", "gt", "lt", "$defs"}  # JSON Schema's words only, every $ref resolvable
    eps = schemas["AttackSpec"]["properties"]["eps"]["anyOf"]
    assert {"type": "number", "minimum": 0.0, "maximum": 1.0} == eps[0] and eps[1]["type"] == "string"
    assert schemas["EvalSpec"]["properties"]["attacks"]["uniqueItems"] is True
    assert "strictly increasing" in schemas["OptimSpec"]["properties"]["milestones"]["description"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path != "/healthz":
                assert {"400", "401", "413", "422", "503"} <= set(responses), (method, path)
                assert operation["security"] == [{"HTTPBearer": []}]
            for code, response in responses.items():
                if code != "200" or path != "/results/{experiment_id}/artifacts/{path}":
                    assert list(response.get("content", {"application/json": 0})) in (
                        ["application/json"], ["text/event-stream"] if code == "200" else []), (method, path, code)
    events = doc["paths"]["/experiments/{experiment_id}/events"]["get"]["responses"]
    assert events["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")
    for route, model in [("/experiments", "ExperimentSpec"), ("/studies", "StudySpec")]:
        body = doc["paths"][route]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert model in schemas
