"""The server side of the web UI, without a browser (tests/test_ui_browser.py drives the pages): /ui's files are
served without a token in deployed mode while every data route still needs it, every module the pages import
exists, and a spec sent as YAML (what the UI sends for a pasted spec) is validated exactly like the same spec as
JSON, with one-line 422s for YAML that does not parse."""

from __future__ import annotations

import re

import pytest
import yaml

from service.app import UI_DIR

try:
    from tests.service_fixtures import AUTH, create_schema, fake_spec, make_client, make_settings
except ImportError:
    from service_fixtures import AUTH, create_schema, fake_spec, make_client, make_settings

YAML = {"Content-Type": "application/yaml"}
IMPORT = re.compile(r'^import .* from "\./([a-z]+\.js)";$', re.MULTILINE)


@pytest.fixture
def client(tmp_path):
    from service.db import make_session_factory

    url = f"sqlite:///{tmp_path / 'igat.db'}"
    engine = create_schema(url)
    with make_client(make_settings(tmp_path, url, open_reads=False), make_session_factory(engine),
                     follow_redirects=False) as c:
        yield c
    engine.dispose()


def test_the_ui_is_served_without_the_token_and_the_data_is_not(client):
    assert client.get("/").headers["location"] == "/ui/"
    assert client.get("/ui").headers["location"].endswith("/ui/")
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="js/main.js">' in page.text
    modules = {"main.js"}
    for name in sorted(p.name for p in (UI_DIR / "js").glob("*.js")):
        served = client.get(f"/ui/js/{name}")
        assert served.status_code == 200 and "javascript" in served.headers["content-type"]
        modules |= set(IMPORT.findall(served.text))
    assert modules == {p.name for p in (UI_DIR / "js").glob("*.js")}, "a module imports one that is missing"
    assert client.get("/ui/style.css").status_code == 200
    assert client.get("/ui/nothing.js").status_code == 404
    for path in ("/experiments", "/studies", "/uix", "/ui-data"):
        assert client.get(path).status_code == 401, path
    assert client.get("/experiments", headers=AUTH).status_code == 200


SPEC_YAML = """
name: yaml-spec
base:
  train: {epochs: 2, lr: 0.1}
ensemble:
  members: 3   # comments, flow mappings: what igat run reads
"""


def test_a_yaml_spec_is_the_same_request_as_its_json(client):
    first = client.post("/experiments", content=SPEC_YAML, headers={**AUTH, **YAML, "Idempotency-Key": "k"})
    assert first.status_code == 202, first.text
    again = client.post("/experiments", json=yaml.safe_load(SPEC_YAML), headers={**AUTH, "Idempotency-Key": "k"})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert (first.json()["spec"]["ensemble"]["members"], first.json()["spec"]["base"]["train"]["epochs"]) == (3, 2)


@pytest.mark.parametrize("route,body", [
    ("/experiments", "name: bad name!\nensemble: {members: 0}\nbase: {train: {epochs: 2, lr: -1}}\nextra: 1\n"),
    ("/experiments", "- a list\n- not a spec\n"),
    ("/studies", "name: s\nexperiment: {}\ngrid: {seed: [0], igat.rule: [soft, median]}\n"),
])
@pytest.mark.parametrize("media", ["application/yaml", "text/yaml", "application/x-yaml; charset=utf-8"])
def test_an_invalid_yaml_spec_gets_the_same_422_as_json(client, route, body, media):
    as_yaml = client.post(route, content=body, headers={**AUTH, "Content-Type": media})
    as_json = client.post(route, json=yaml.safe_load(body), headers=AUTH)
    assert as_yaml.status_code == as_json.status_code == 422
    assert as_yaml.json() == as_json.json()


@pytest.mark.parametrize("body,needle", [
    (b"name: [x\n", "not valid YAML: while parsing a flow sequence (line 1, column 7): expected ',' or ']', but "
                    "got '<stream end>' (line 2, column 1)"),
    (b"a: b: c\n", "not valid YAML: mapping values are not allowed here (line 1, column 5)"),
    (b"a: &x [1, 2]\nb: *x\n", "not valid YAML: aliases (*name) are not accepted here: write the value out "
                               "(line 2, column 4)"),
    (b"\xff\xfe", "not valid UTF-8"),
    (b"# only a comment\n", "a YAML body is required"),
    (b"[" * 5000, "nested deeper than 32 levels"),
])
def test_yaml_that_does_not_parse_is_a_one_line_422(client, body, needle):
    r = client.post("/experiments", content=body, headers={**AUTH, **YAML})
    assert r.status_code == 422
    (problem,) = r.json()["detail"]
    assert problem["field"] == "(root)" and problem["msg"].startswith(needle) and "\n" not in problem["msg"]


def test_a_deep_yaml_document_names_where(client):
    r = client.post("/experiments", content="a:\n  b: " + "[" * 40 + "x" + "]" * 40, headers={**AUTH, **YAML})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "a", "b", *[0] * 30]


def test_a_yaml_study_is_queued(client):
    body = yaml.safe_dump({"name": "ys", "experiment": fake_spec("ok", 1), "grid": {"seed": [0, 1]}})
    r = client.post("/studies", content=body, headers={**AUTH, **YAML})
    assert r.status_code == 202, r.text
    assert [run["name"] for run in r.json()["experiments"]] == ["ys-seed0-igat", "ys-seed1-igat"]


def test_a_yaml_body_without_the_token_is_refused_before_it_is_read(client):
    r = client.post("/experiments", content=SPEC_YAML, headers=YAML)
    assert r.status_code == 401
    assert client.get("/experiments", headers=AUTH).json()["total"] == 0
