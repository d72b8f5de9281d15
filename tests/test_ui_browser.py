"""The web UI (/ui) in a real browser: Debian's headless Chromium driven by Playwright, against the real app served
by uvicorn on a free port, a real SQLite database in deployed mode (IGAT_OPEN_READS=false, so every read the pages
make carries the token, the event stream included) and a dispatcher running the stand-in runner.

The stand-in runner leaves tests/fixtures/quickstart_results_3_failed_checks.json (a real quickstart run of
2026-12-02, 3 of its sanity checks failed) as a finished experiment's results.json, with real plots and checkpoint
files, and per-run results for a 6-run study.
The tests compare every number the UI's tables show with the run's results.json and the study's results route.

Each test writes a screenshot to var/ui-screenshots/<name>.png. Without Chromium or Playwright the tests skip;
under CI (`CI` or `IGAT_REQUIRE_BROWSER` set, as .ci/run does) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from igat_core.rundir import RESULTS_FILE, model_checkpoint, read_results
from igat_core.study_spec import parse_study, plan_study

try:
    from tests.service_fixtures import AUTH, FAKE_RUNNER, ROOT, TOKEN, create_schema, fake_spec, free_port, \
        make_settings, wait_for
except ImportError:
    from service_fixtures import AUTH, FAKE_RUNNER, ROOT, TOKEN, create_schema, fake_spec, free_port, \
        make_settings, wait_for

CHROMIUM = Path(os.environ.get("IGAT_CHROMIUM", "/usr/bin/chromium"))
#: Without the background-networking flags Chromium keeps trying to reach Google's servers, which a closed
#: network answers slowly or never.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "var" / "ui-screenshots"
QUICKSTART = ROOT / "tests" / "fixtures" / "quickstart_results_3_failed_checks.json"
WAIT_MS = 30_000
STUDY = {"name": "uis", "description": "Tables 1-3 over three seeds, for the UI test.",
         "experiment": {**fake_spec("ok", epochs=2), "controls": ["global_at"]}, "grid": {"seed": [0, 1, 2]},
         "arms": {"igat": {}, "hard": {"igat.rule": "hard"}}, "tables": ["table1", "table2", "table3"]}
BAD_SPEC = "name: bad name!\nensemble:\n  members: 0\nbase:\n  train:\n    epochs: 2\n    lr: -0.1\n"


def browser_missing(reason: str) -> None:
    if os.environ.get("CI") or os.environ.get("IGAT_REQUIRE_BROWSER"):
        pytest.fail(f"{reason} (the browser tests are required here: CI / IGAT_REQUIRE_BROWSER is set)")
    pytest.skip(reason)


# ------------------------------------------------------------------------------------------------ the server


def prepare_results(root: Path) -> Path:
    """FAKE_RESULTS_DIR: the finished experiment's files, and the study runs' results.json."""
    from igat_core.theory.plots import plot_diagnostics

    results = json.loads(QUICKSTART.read_text())
    for name in ("quickstart", "live"):
        (root / name).mkdir(parents=True)
        shutil.copy(QUICKSTART, root / name / RESULTS_FILE)
    plot_diagnostics(results["diagnostics"], root / "quickstart" / "plots" / "diagnostics.png")
    for model in ("base", "global_at", "igat"):
        path = root / "quickstart" / model_checkpoint(model)
        path.parent.mkdir(parents=True)
        path.write_bytes(f"not a real {model} checkpoint".encode())
    for k, planned in enumerate(plan_study(parse_study(STUDY))):
        shift = 0.7 * planned.spec.seed - (1.3 if planned.arm == "hard" else 0.0) + 0.1 * k
        evaluation = {m: {c: {a: min(100.0, v + shift * (1 + 0.4 * j) - 0.5 * (k * j % 3)) for a, v in by_a.items()}
                          for c, by_a in by_c.items()}
                      for j, (m, by_c) in enumerate(results["evaluation"].items()) if isinstance(by_c, dict)}
        (root / planned.name).mkdir()
        (root / planned.name / RESULTS_FILE).write_text(json.dumps({"evaluation": evaluation}))
    return root


class Served:
    """uvicorn and a dispatcher, each in a thread of this process; the runs are subprocesses."""

    def __init__(self, tmp: Path):
        import uvicorn

        from service.app import create_app
        from service.db import make_session_factory
        from service.dispatcher import Dispatcher

        runner = tmp / "fake_runner.py"
        runner.write_text(FAKE_RUNNER)
        url = f"sqlite:///{tmp / 'igat.db'}"
        self.engine = create_schema(url)
        settings = make_settings(tmp, url, runner_command=[sys.executable, str(runner)], open_reads=False,
                                 max_concurrent_experiments=4, dispatcher_poll_s=0.1, sse_poll_s=0.1)
        sessions = make_session_factory(self.engine)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(create_app(settings, session_factory=sessions), host="127.0.0.1",
                                port=int(self.url.rsplit(":", 1)[1]), log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.dispatcher = Dispatcher(settings, session_factory=sessions)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.server.run, daemon=True),
                        threading.Thread(target=self.dispatcher.run, args=(self.stop,), daemon=True)]
        for thread in self.threads:
            thread.start()
        wait_for(lambda: self.server.started, 30, what="uvicorn to start")
        self.ids: dict[str, str] = {}

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def submit(self, name: str, epochs: int) -> str:
        with self.api() as client:
            r = client.post("/experiments", json=fake_spec(name, epochs=epochs))
        assert r.status_code == 202, r.text
        self.ids[name] = r.json()["id"]
        return self.ids[name]

    def status(self, experiment_id: str) -> str:
        with self.api() as client:
            return client.get(f"/experiments/{experiment_id}").json()["status"]

    def close(self) -> None:
        self.stop.set()
        self.threads[1].join(30)
        for watched in list(self.dispatcher.watched.values()):  # a run a failed test left going
            self.dispatcher.executor.cancel(watched.handle, force=True)
        self.server.should_exit = True
        self.threads[0].join(30)
        self.engine.dispose()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FAKE_EPOCH_S", "0.2")
        env.setenv("FAKE_RESULTS_DIR", str(prepare_results(tmp / "prepared")))
        served = Served(tmp)
        try:
            served.submit("fail", 1)
            finished = served.submit("quickstart", 3)
            served.submit("live", 10_000)
            with served.api() as client:
                r = client.post("/studies", json=STUDY)
                assert r.status_code == 202, r.text
                served.ids["study"] = r.json()["id"]
            wait_for(lambda: served.status(finished) == "succeeded", 60, what="the finished experiment")
            yield served
        finally:
            served.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        browser_missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("Playwright for Python is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Exception as exc:
            browser_missing(f"Chromium at {CHROMIUM} did not start: {' '.join(str(exc).split())[:300]}")
        yield chromium
        chromium.close()


def open_page(browser, served: Served, path: str, *, token: bool = True):
    context = browser.new_context(viewport={"width": 1360, "height": 900}, base_url=served.url)
    context.set_default_timeout(WAIT_MS)
    if token:
        context.add_init_script(f"sessionStorage.setItem('igat.api-token', {json.dumps(TOKEN)})")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"/ui/{path}")
    page.errors = errors
    return page


def screenshot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert page.errors == [], f"the page threw: {page.errors}"
    page.context.close()


# ------------------------------------------------------------------------------------------------ the tests


def test_the_list_asks_for_the_token_then_filters_by_status_newest_first(browser, served):
    page = open_page(browser, served, "", token=False)
    page.locator("#list .error").first.wait_for()
    assert "401" in page.locator("#list .error").first.inner_text()
    page.fill("#token-input", TOKEN)
    page.click("#token-form button[type=submit]")
    rows = page.locator("#experiments tbody tr")
    rows.first.wait_for()
    with served.api() as client:
        newest_first = [e["id"] for e in client.get("/experiments", params={"limit": 50}).json()["items"]]
    assert [rows.nth(i).get_attribute("data-id") for i in range(rows.count())] == newest_first
    assert page.locator("#studies tbody tr").get_attribute("data-id") == served.ids["study"]

    page.check("#status-filter input[value=failed]")
    page.wait_for_function("location.hash === '#/?status=failed'")
    page.locator("#experiments tbody tr[data-status=failed]").wait_for()
    assert page.locator("#experiments tbody tr").count() == 1
    assert page.locator("#experiments tbody tr").get_attribute("data-id") == served.ids["fail"]
    assert "boom in the fake runner" in page.locator("#experiments tbody tr td.error").inner_text()
    page.check("#status-filter input[value=succeeded]")
    page.wait_for_function("location.hash === '#/?status=succeeded&status=failed'")
    page.locator(f"#experiments tbody tr[data-id='{served.ids['quickstart']}']").wait_for()
    statuses = page.locator("#experiments tbody tr").evaluate_all("rows => rows.map(r => r.dataset.status)")
    assert set(statuses) <= {"succeeded", "failed"} and "failed" in statuses
    screenshot(page, "list-filtered")


def table_cells(page, table: str, row_key: str) -> dict[tuple[str, str, str], tuple[float, str]]:
    cells = page.locator(f"#{table} tbody td").evaluate_all(
        f"tds => tds.map(td => [td.closest('tr').dataset.{row_key}, td.dataset.combiner, td.dataset.attack, "
        "td.dataset.value === undefined ? null : td.dataset.value, td.textContent])")
    return {(row, c, a): (float(v) if v is not None else None, text) for row, c, a, v, text in cells}


def expected_cells(values: dict, signed: bool = False) -> dict[tuple[str, str, str], tuple[float, str]]:
    return {(row, c, a): (v, f"{v:+.2f}" if signed else f"{v:.2f}")
            for row, by_c in values.items() for c, by_a in by_c.items() for a, v in by_a.items()}


def test_a_finished_experiment_shows_its_results_json(browser, served):
    experiment_id = served.ids["quickstart"]
    page = open_page(browser, served, f"#/experiments/{experiment_id}")
    page.locator("#table1").wait_for()
    results = read_results(served.dispatcher.artifact_root / experiment_id)
    evaluation = {m: v for m, v in results["evaluation"].items() if isinstance(v, dict)}
    assert table_cells(page, "table1", "model") == expected_cells(evaluation)
    assert table_cells(page, "table2", "reference") == expected_cells(results["improvement_over"], signed=True)
    assert table_cells(page, "gains", "reference") == expected_cells(results["gain_points"], signed=True)

    failed = [name for name, check in results["sanity"].items() if not check["passed"]]
    shown = page.locator("#sanity tr").evaluate_all("rows => rows.map(r => [r.dataset.check, r.className])")
    assert shown[:3] == [[name, "fail"] for name in failed] and len(failed) == 3
    assert sorted(name for name, _ in shown) == sorted(results["sanity"])
    red = page.locator("#sanity tr.fail td").first.evaluate("td => getComputedStyle(td).color")
    assert red == "rgb(198, 40, 40)"
    assert page.locator("#sanity-summary").inner_text().startswith(f"3 of {len(results['sanity'])} sanity checks")
    assert page.locator("#sanity").evaluate("s => s.compareDocumentPosition(document.querySelector('#table1'))") & 4

    assert page.locator("#diagnostics tbody tr").count() >= 11
    assert f"{results['diagnostics']['igat']['p']:.2f}%" in page.locator("#diagnostics").inner_text()
    page.wait_for_function("document.querySelector('#plots img').naturalWidth > 0")
    cells = {(m, c, a) for m, by_c in evaluation.items() for c, by_a in by_c.items() for a in by_a}
    progress = page.locator("#evaluation-progress td[data-eval]").evaluate_all(
        "tds => tds.map(td => [td.dataset.eval, td.textContent.trim()])")
    assert sorted(progress) == sorted([f"{m}/{c}/{a}", f"{evaluation[m][c][a]:.2f}"] for m, c, a in cells)
    assert page.locator("svg[data-chart=loss]").get_attribute("data-points") == "3"
    assert page.locator("svg[data-chart=acc]").get_attribute("data-points") == "3"

    links = page.locator("#downloads a").evaluate_all("links => links.map(a => a.dataset.artifact)")
    assert {RESULTS_FILE, *(model_checkpoint(m) for m in ("base", "global_at", "igat"))} <= set(links)
    with page.expect_download() as download:
        page.click(f"#downloads a[data-artifact='{RESULTS_FILE}']")
    assert json.loads(Path(download.value.path()).read_text()) == results
    screenshot(page, "experiment-finished")


def test_a_running_experiment_updates_live(browser, served):
    experiment_id = served.ids["live"]
    page = open_page(browser, served, f"#/experiments/{experiment_id}")
    page.locator("#epoch").wait_for()
    page.evaluate("window.notReloaded = true")
    first = int(page.locator("#events tbody tr").first.get_attribute("data-seq"))
    page.wait_for_function(f"Number(document.querySelector('#events tbody tr').dataset.seq) > {first + 2}")
    page.wait_for_function("Number(document.querySelector('svg[data-chart=loss]')?.dataset.points) >= 2")
    page.wait_for_function("document.querySelector('#training-progress') !== null")
    assert page.evaluate("window.notReloaded") is True
    assert page.locator("#summary .status").inner_text() == "running"
    epoch = page.locator("#epoch").inner_text()
    assert "pretrain epoch" in epoch and "of 10000" in epoch
    screenshot(page, "experiment-live")


def test_an_uploaded_bad_spec_is_refused_with_the_apis_field_errors(browser, served):
    page = open_page(browser, served, "#/submit")
    page.set_input_files("#spec-file", files=[{"name": "bad.yaml", "mimeType": "application/yaml",
                                               "buffer": BAD_SPEC.encode()}])
    page.wait_for_function(f"document.querySelector('#spec-text').value === {json.dumps(BAD_SPEC)}")
    page.click("#submit-button")
    page.locator("#problems li").first.wait_for()
    shown = page.locator("#problems li").evaluate_all("items => items.map(li => [li.dataset.field, li.textContent])")
    with served.api() as client:
        as_yaml = client.post("/experiments", content=BAD_SPEC, headers={"Content-Type": "application/yaml"})
        as_json = client.post("/experiments", json=yaml.safe_load(BAD_SPEC))
    assert as_yaml.status_code == as_json.status_code == 422
    assert as_yaml.json() == as_json.json()
    assert shown == [[p["field"], f"{p['field']}: {p['msg']}"] for p in as_yaml.json()["detail"]]
    assert {"name", "ensemble.members", "base.train.lr"} <= {field for field, _ in shown}
    screenshot(page, "submit-field-errors")


def test_without_the_token_nothing_is_submitted_or_cancelled(browser, served):
    with served.api() as client:
        before = client.get("/experiments").json()["total"]
    page = open_page(browser, served, "#/submit", token=False)
    page.fill("#spec-text", "name: from-the-ui\nbase:\n  train:\n    epochs: 1\n    lr: 0.1\n")
    page.click("#submit-button")
    page.locator("#submit-error").wait_for()
    assert "401: missing 'Authorization: Bearer <token>' header" in page.locator("#submit-error").inner_text()
    screenshot(page, "submit-without-token")
    with served.api() as client:
        assert client.get("/experiments").json()["total"] == before

    page = open_page(browser, served, f"#/experiments/{served.ids['live']}", token=False)
    page.fill("#token-input", "not-the-token")
    page.click("#token-form button[type=submit]")
    page.wait_for_function("document.querySelector('#experiment .error')?.textContent"
                           ".includes('401: invalid API token')")
    assert served.status(served.ids["live"]) == "running"
    page.context.close()


def test_cancelling_a_running_experiment(browser, served):
    experiment_id = served.ids["live"]
    page = open_page(browser, served, f"#/experiments/{experiment_id}")
    page.locator("#cancel").click()
    page.locator("#experiment[data-ended=cancelled]").wait_for()
    assert page.locator("#summary .status").inner_text() == "cancelled"
    assert page.locator("#cancel").count() == 0
    assert served.status(experiment_id) == "cancelled"
    statuses = page.locator("#events tbody tr[data-kind=status] td:last-child").all_inner_texts()
    assert statuses[:2] == ["cancelled: the run was stopped", "cancel requested"]
    screenshot(page, "experiment-cancelled")


def study_cells(page, table: str) -> list[dict]:
    return page.locator(f"#{table} tbody td[data-column]").evaluate_all(
        "tds => tds.map(td => ({row: td.closest('tr').dataset.row, column: td.dataset.column, mean: td.dataset.mean, "
        "std: td.dataset.std, low: td.dataset.low, high: td.dataset.high, n: td.dataset.n, "
        "text: td.querySelector('.spread').textContent, interval: td.querySelector('.interval')?.textContent, "
        "bars: td.querySelectorAll('svg.errorbar circle.mean').length}))")


def expected_study(rows: list[dict], keys: tuple[str, ...], signed: bool = False, titles: dict | None = None) -> list:
    titles = titles or {}
    shown = [k for k in keys if any(r[k] not in ("", None) for r in rows)]
    out = []
    for r in rows:
        mean = f"{r['mean']:+.2f}" if signed else f"{r['mean']:.2f}"
        spread = f" ± {(r['high'] - r['low']) / 2:.2f}" if "low" in r else f" ± {r['std']:.2f}"
        out.append({"row": " / ".join(str(titles.get(r[k], r[k])) for k in shown),
                    "column": f"{r['combiner']} {ATTACK_TITLES[r['attack']]}", "mean": r["mean"], "std": r["std"],
                    "low": r.get("low"), "high": r.get("high"), "n": r["n"], "text": f"{mean}{spread}",
                    "interval": f"[{r['low']:+.2f}, {r['high']:+.2f}]" if "low" in r else None})
    return out


ATTACK_TITLES = {"natural": "Natural", "pgd": "PGD", "cw": "CW", "signhunter": "SH", "autoattack": "AA",
                 "mim": "MIM", "simba": "SimBA", "bandits": "Bandits", "union": "Union"}


def test_a_study_page_shows_tables_1_to_3_with_error_bars(browser, served):
    study_id = served.ids["study"]
    with served.api() as client:
        wait_for(lambda: client.get(f"/studies/{study_id}").json()["status"] == "succeeded", 90, interval=0.3,
                 what="the study's runs")
        record = client.get(f"/studies/{study_id}/results").json()
    page = open_page(browser, served, f"#/studies/{study_id}")
    page.locator("#study[data-status=succeeded] #study-table3-paired").wait_for()
    differences = [{**r["difference"], **{k: r[k] for k in ("setting", "arm", "combiner", "attack")}}
                   for r in record["table3"] if r["difference"]]
    for table, rows, keys, signed in (
            ("study-table1", record["table1"], ("setting", "method", "model"), False),
            ("study-table2", record["table2"]["relative_improvement"], ("setting", "method"), True),
            ("study-table2-paired", record["table2"]["paired"], ("setting", "method", "comparison"), True),
            ("study-table3", record["table3"], ("setting", "arm"), False),
            ("study-table3-paired", differences, ("setting", "arm"), True)):
        shown = study_cells(page, table)
        expected = expected_study(rows, keys, signed, {"igat": "iGAT"} if table == "study-table1" else None)
        assert len(shown) == len(expected) > 0, table
        wanted = {(want["row"], want["column"]): want for want in expected}
        for cell in shown:
            want = wanted.pop((cell["row"], cell["column"]))
            assert cell["bars"] == 1
            assert (float(cell["mean"]), int(cell["n"])) == (want["mean"], want["n"]), table
            assert (cell["text"], cell["interval"]) == (want["text"], want["interval"]), table
            if want["low"] is not None:
                assert (float(cell["low"]), float(cell["high"])) == (want["low"], want["high"])
            else:
                assert float(cell["std"]) == want["std"]
    assert page.locator("#study-runs tbody tr[data-status=succeeded]").count() == 6
    screenshot(page, "study")
