"""The REST API: validation, auth, ids, idempotency, SSE resumption, results and artifact paths.

Every bad input must get a 4xx with a message, never a 5xx.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service import store
from service.db import session_scope
from service.models import RUNNING, SUCCEEDED

try:
    from tests.service_fixtures import AUTH, TOKEN, db_url, make_client, make_settings, pg_url, sessions, sqlite_url  # noqa: F401,E501
    from tests.service_fixtures import create_schema, fake_spec
except ImportError:
    from service_fixtures import AUTH, TOKEN, db_url, make_client, make_settings, pg_url, sessions, sqlite_url  # noqa: F401,E501
    from service_fixtures import create_schema, fake_spec


@pytest.fixture
def settings(tmp_path, db_url):
    return make_settings(tmp_path, db_url)


@pytest.fixture
def client(settings, sessions):
    with make_client(settings, sessions) as c:
        yield c


def submit(client, body=None, **kw):
    return client.post("/experiments", json=body if body is not None else fake_spec(), headers=AUTH, **kw)


def finish(sessions, experiment_id, run_dir: Path, results: dict | None = None):
    """Drive an experiment to succeeded the way the dispatcher would, with a run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if results is not None:
        (run_dir / "results.json").write_text(json.dumps(results))
    with session_scope(sessions) as s:
        store.transition(s, experiment_id, RUNNING, run_dir=str(run_dir))
        store.add_event(s, experiment_id, "epoch", "epoch 1", phase="pretrain")
        store.upsert_metrics(s, experiment_id, [("pretrain", 1, {"loss": 1.0}), ("pretrain", 2, {"loss": 0.5})])
        store.transition(s, experiment_id, SUCCEEDED)


# ----------------------------------------------------------------------------------------------- submit


def test_submit_returns_202_and_location(client):
    r = submit(client, fake_spec("first"), params={"priority": 3})
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/experiments/{body['id']}"
    assert body["status"] == "queued" and body["priority"] == 3 and body["attempt"] == 0
    assert body["spec"]["name"] == "first" and body["spec"]["dataset"]["name"] == "digits"  # defaults filled in
    got = client.get(r.headers["location"])
    assert got.status_code == 200 and got.json()["id"] == body["id"]


def test_invalid_spec_names_each_field(client):
    bad = {"name": "bad name!", "dataset": {"name": "imagenet"}, "ensemble": {"members": 0}, "typo": 1,
           "base": {"train": {"epochs": 1}}}
    r = submit(client, bad)
    assert r.status_code == 422
    problems = {p["field"]: p["msg"] for p in r.json()["detail"]}
    assert set(problems) >= {"name", "dataset.name", "ensemble.members", "typo", "base.train.lr"}
    assert "greater than or equal to 1" in problems["ensemble.members"]
    assert "Extra inputs are not permitted" in problems["typo"]
    assert "dataset.name" in r.json()["message"]


def test_a_misspelt_base_parameter_is_refused_at_submission(client):
    r = submit(client, {"base": {"method": "adp", "params": {"alpah": 2.0}}})
    assert r.status_code == 422
    (problem,) = r.json()["detail"]
    assert problem["field"] == "base" and "'alpah'" in problem["msg"] and "alpha" in problem["msg"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": b"{not json", "headers": {**AUTH, "Content-Type": "application/json"}},
        {"content": b"[1, 2]", "headers": {**AUTH, "Content-Type": "application/json"}},
        {"content": b"", "headers": AUTH},
        {"json": {"name": "x"}, "params": {"priority": "high"}, "headers": AUTH},
        {"json": {"name": "x"}, "params": {"priority": 10**6}, "headers": AUTH},
        {"json": {"eval": {"eps": "8/0"}}, "headers": AUTH},
        {"json": {"eval": {"attacks": []}}, "headers": AUTH},
        {"json": {"name": "x"}, "headers": {**AUTH, "Idempotency-Key": "k" * 300}},
    ],
)
def test_bad_requests_are_422(client, kwargs):
    r = client.post("/experiments", **kwargs)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] and r.json()["message"]


def test_idempotency_key(client):
    key = {"Idempotency-Key": "abc-123"}
    first = client.post("/experiments", json=fake_spec("a"), headers={**AUTH, **key})
    again = client.post("/experiments", json=fake_spec("a"), headers={**AUTH, **key})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers.get("idempotent-replayed") == "true"
    other_body = client.post("/experiments", json=fake_spec("b"), headers={**AUTH, **key})
    assert other_body.status_code == 422 and "already used" in other_body.json()["detail"]
    other_priority = client.post("/experiments", json=fake_spec("a"), params={"priority": 1}, headers={**AUTH, **key})
    assert other_priority.status_code == 422
    assert client.get("/experiments").json()["total"] == 1


# -------------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers,needle",
    [
        ({}, "missing"),
        ({"Authorization": "Bearer wrong"}, "invalid API token"),
        ({"Authorization": f"Basic {TOKEN}"}, "Bearer"),
        ({"Authorization": "Bearer "}, "Bearer"),
        ({"Authorization": b"Bearer " + "\u00e9".encode("latin-1") * 10}, "invalid API token"),
    ],
)
def test_mutations_need_the_token(client, headers, needle):
    created = submit(client).json()["id"]
    for method, path in [("POST", "/experiments"), ("POST", f"/experiments/{created}/cancel")]:
        r = client.request(method, path, json=fake_spec(), headers=headers)
        assert r.status_code == 401, r.text
        assert needle in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get(f"/experiments/{created}").json()["status"] == "queued"


def test_no_token_configured_refuses_mutations(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, api_token=None)
    engine = create_schema(sqlite_url)
    from service.db import make_session_factory

    with make_client(settings, make_session_factory(engine)) as c:
        r = c.post("/experiments", json=fake_spec(), headers=AUTH)
        assert r.status_code == 503 and "IGAT_API_TOKEN" in r.json()["detail"]
        assert c.get("/experiments").status_code == 200  # reads still work
    engine.dispose()


# --------------------------------------------------------------------------------------- reads, 404, 409


def test_unknown_ids_are_404(client):
    for path in ["/experiments/nope", "/experiments/nope/events", "/experiments/nope/metrics", "/results/nope",
                 "/results/nope/artifacts", "/results/nope/artifacts/results.json",
                 "/experiments/" + "x" * 500]:
        r = client.get(path)
        assert r.status_code == 404, path
        assert "nope" in r.json()["detail"] or "no experiment" in r.json()["detail"]
    assert client.post("/experiments/nope/cancel", headers=AUTH).status_code == 404


def test_list_filter_and_pagination(client, sessions):
    ids = [submit(client, fake_spec(f"e{i}")).json()["id"] for i in range(5)]
    client.post(f"/experiments/{ids[0]}/cancel", headers=AUTH)
    page = client.get("/experiments", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    assert [e["id"] for e in page["items"]] == [ids[3], ids[2]]  # newest first
    queued = client.get("/experiments", params={"status": "queued"}).json()
    assert queued["total"] == 4 and ids[0] not in {e["id"] for e in queued["items"]}
    both = client.get("/experiments", params=[("status", "queued"), ("status", "cancelled")]).json()
    assert both["total"] == 5
    for params in [{"status": "paused"}, {"limit": 0}, {"limit": 10**6}, {"offset": -1}]:
        assert client.get("/experiments", params=params).status_code == 422


def test_cancel_queued_and_finished(client, sessions, tmp_path):
    e = submit(client).json()["id"]
    r = client.post(f"/experiments/{e}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    again = client.post(f"/experiments/{e}/cancel", headers=AUTH)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_results_lifecycle(client, sessions, tmp_path):
    e = submit(client).json()["id"]
    r = client.get(f"/results/{e}")
    assert r.status_code == 409 and "queued" in r.json()["detail"]
    results = {"evaluation": {"igat": {"average": {"pgd": 42.0}}}}
    finish(sessions, e, tmp_path / "run", results)
    r = client.get(f"/results/{e}")
    assert r.status_code == 200 and r.json() == results
    metrics = client.get(f"/experiments/{e}/metrics", params={"limit": 1}).json()
    assert metrics["total"] == 2 and metrics["items"][0]["values"] == {"loss": 1.0}


def test_results_missing_file_and_failed(client, sessions, tmp_path):
    e = submit(client).json()["id"]
    finish(sessions, e, tmp_path / "run", results=None)
    r = client.get(f"/results/{e}")
    assert r.status_code == 404 and "missing" in r.json()["detail"]
    f = submit(client, fake_spec("f")).json()["id"]
    with session_scope(sessions) as s:
        store.transition(s, f, RUNNING)
        store.transition(s, f, "failed", error="the runner exited with code 1\nTraceback ...")
    r = client.get(f"/results/{f}")
    assert r.status_code == 409 and "the runner exited with code 1" in r.json()["detail"]


# ----------------------------------------------------------------------------------------------- artifacts


def test_artifacts_and_traversal(client, sessions, tmp_path):
    e = submit(client).json()["id"]
    run = tmp_path / "run"
    finish(sessions, e, run, {"ok": True})
    (run / "plots").mkdir()
    (run / "plots" / "curve.png").write_bytes(b"\x89PNG fake")
    (run / "report.md").write_text("# report\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    os.symlink(secret, run / "escape.txt")
    os.symlink(tmp_path, run / "up")

    assert client.get(f"/results/{e}/artifacts/report.md").text == "# report\n"
    png = client.get(f"/results/{e}/artifacts/plots/curve.png")
    assert png.status_code == 200 and png.content == b"\x89PNG fake" and png.headers["content-type"] == "image/png"
    listed = {a["path"] for a in client.get(f"/results/{e}/artifacts").json()["items"]}
    assert {"report.md", "results.json", "plots/curve.png"} <= listed and "escape.txt" not in listed

    attempts = {
        "..%2Fsecret.txt": 400,
        "%2e%2e/secret.txt": 400,
        "%2E%2E%2Fsecret.txt": 400,
        "plots/..%2F..%2Fsecret.txt": 400,
        "plots/%2e%2e/%2e%2e/secret.txt": 400,
        "%2Fetc%2Fpasswd": 400,
        "%2F%2Fetc/passwd": 400,
        "C:%5Cwindows": 400,
        "..%5C..%5Csecret.txt": 400,
        "report.md%00.png": 400,
        "%2E/report.md": 400,
        "plots%2F%2Fcurve.png": 400,
        "escape.txt": 403,
        "up/secret.txt": 403,
        "nothere.txt": 404,
        "plots": 404,
        "%252e%252e%252fsecret.txt": (400, 404),  # double-encoded: rejected or a literal missing name
    }
    for raw, expected in attempts.items():
        r = client.get(f"/results/{e}/artifacts/{raw}")
        assert r.status_code in (expected if isinstance(expected, tuple) else (expected,)), (raw, r.status_code, r.text)
        assert "do not serve" not in r.text
        assert r.json()["detail"]


def test_artifacts_before_the_run_started(client):
    e = submit(client).json()["id"]
    r = client.get(f"/results/{e}/artifacts/results.json")
    assert r.status_code == 404 and "no files yet" in r.json()["detail"]
    assert client.get(f"/results/{e}/artifacts").json() == {"items": []}


# ----------------------------------------------------------------------------------------------------- SSE


def _sse(text: str) -> list[dict[str, str]]:
    from service.cli import parse_sse

    return list(parse_sse(iter(text.splitlines())))


def test_sse_replays_and_resumes_with_last_event_id(client, sessions, tmp_path):
    e = submit(client).json()["id"]
    finish(sessions, e, tmp_path / "run", {"ok": True})
    r = client.get(f"/experiments/{e}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    data = [ev for ev in events if "id" in ev]
    assert [int(ev["id"]) for ev in data] == [1, 2, 3, 4]
    assert [json.loads(ev["data"])["kind"] for ev in data] == ["status", "status", "epoch", "status"]
    assert events[-1]["event"] == "end" and json.loads(events[-1]["data"])["status"] == "succeeded"

    resumed = _sse(client.get(f"/experiments/{e}/events", headers={"Last-Event-ID": "2"}).text)
    assert [int(ev["id"]) for ev in resumed if "id" in ev] == [3, 4]
    via_query = _sse(client.get(f"/experiments/{e}/events", params={"after": 3}).text)
    assert [int(ev["id"]) for ev in via_query if "id" in ev] == [4]
    for bad in ["abc", "-1"]:
        r = client.get(f"/experiments/{e}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"]


# ----------------------------------------------------------------------------------------------- service


def test_healthz_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/experiments", "/experiments/{experiment_id}", "/experiments/{experiment_id}/cancel",
            "/experiments/{experiment_id}/events", "/experiments/{experiment_id}/metrics",
            "/results/{experiment_id}", "/results/{experiment_id}/artifacts/{path}", "/healthz"} <= paths
    body = spec["paths"]["/experiments"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ExperimentSpec")
    assert client.get("/docs").status_code == 200


def test_healthz_reports_a_dead_database(tmp_path):
    settings = make_settings(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none")
    with make_client(settings) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and "database" in r.json()["detail"]
        r = c.get("/experiments")
        assert r.status_code == 503


def test_hostile_input_is_never_a_5xx(settings, sessions):
    with make_client(settings, sessions, raise_server_exceptions=False) as client:
        e = submit(client).json()["id"]
        probes = [
            ("GET", "/experiments/%00", 404),
            ("GET", "/results/%00", 404),
            ("GET", "/results/%00/artifacts/x", 404),
            ("GET", "/experiments/" + "%C3%A9" * 40, 404),
            ("POST", "/experiments/%00/cancel", 404),
            ("GET", f"/experiments/{e}/metrics?phase=%00", 422),
            ("GET", "/experiments?offset=99999999999999999999", 422),
            ("GET", f"/experiments/{e}/events?after=99999999999999999999", 422),
            ("GET", "/experiments?status=%00", 422),
        ]
        for method, path, expected in probes:
            r = client.request(method, path, headers=AUTH)
            assert r.status_code == expected, (path, r.status_code, r.text)
            assert r.json()["detail"]
        r = client.get(f"/experiments/{e}/events", headers={"Last-Event-ID": "9" * 30})
        assert r.status_code == 400
        for body in [{"base": {"params": {"k": "a\u0000b"}}}, {"name": "a\u0000b"}, {"seed": 2**80},
                     {"ensemble": {"width": 1e308}}, {"dataset": []}, {"eval": {"eps": "1/3/4"}}]:
            r = client.post("/experiments", json=body, headers=AUTH)
            assert r.status_code < 500, (body, r.status_code, r.text)
        r = client.post("/experiments", content=b'{"igat": {"alpha": NaN}}',
                        headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422
        r = client.post("/experiments", content=b"\xff\xfe", headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422
