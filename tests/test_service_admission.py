"""What the service admits (service.admission) through the real app: `base.checkpoint` only from allowed roots or
by reference to another experiment, non-finite numbers and oversized specs refused with the field named.

A refused checkpoint answers 422 naming `base.checkpoint`, with one reason that is the same whether or not a file
exists outside the roots; nothing is queued.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from igat_core.rundir import model_checkpoint, run_dir_of
from service import admission, store
from service.db import session_scope
from service.models import RUNNING, SUCCEEDED

try:
    from tests.service_fixtures import AUTH, db_url, fake_spec, make_client, make_settings, pg_url, sessions, sqlite_url  # noqa: F401,E501
except ImportError:
    from service_fixtures import AUTH, db_url, fake_spec, make_client, make_settings, pg_url, sessions, sqlite_url  # noqa: F401,E501


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    found = {name: tmp_path / name for name in ("artifacts", "data", "extra", "outside")}
    for path in found.values():
        path.mkdir()
        (path / "ensemble.pt").write_bytes(b"weights")
    return found


@pytest.fixture
def settings(tmp_path, db_url, roots):
    return make_settings(tmp_path, db_url, data_root=roots["data"], checkpoint_roots=[roots["extra"]])


@pytest.fixture
def client(settings, sessions):
    with make_client(settings, sessions) as c:
        yield c


def with_checkpoint(checkpoint: str, name: str = "ckpt") -> dict:
    spec = fake_spec(name)
    spec["base"]["checkpoint"] = checkpoint
    return spec


def post(client, body: dict, route: str = "/experiments"):
    """Sent as raw JSON, so that NaN and Infinity reach the app as JSON's non-standard literals."""
    return client.post(route, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})


def problems(response) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    return [(p["field"], p["msg"]) for p in response.json()["detail"]]


def queued(client) -> int:
    return client.get("/experiments").json()["total"]


def refused_checkpoint(client, checkpoint: str) -> str:
    found = problems(post(client, with_checkpoint(checkpoint)))
    assert [field for field, _ in found] == ["base.checkpoint"], found
    return found[0][1]


# ---------------------------------------------------------------------------------------------- refused


def test_checkpoints_outside_the_allowed_roots_are_refused_alike_whether_or_not_the_file_exists(client, roots):
    outside = roots["outside"] / "ensemble.pt"
    (roots["artifacts"] / "escape.pt").symlink_to(outside)
    (roots["artifacts"] / "dir-escape").symlink_to(roots["outside"], target_is_directory=True)
    forms = {
        "absolute": str(outside),
        "absolute, no such file": str(roots["outside"] / "missing.pt"),
        "system file": "/etc/passwd",
        "../ escape": f"{roots['artifacts']}/../outside/ensemble.pt",
        "../ escape, no such file": f"{roots['artifacts']}/../outside/missing.pt",
        "symlinked file": str(roots["artifacts"] / "escape.pt"),
        "symlinked directory": str(roots["artifacts"] / "dir-escape" / "ensemble.pt"),
        "prefix of a root": f"{roots['artifacts']}-not/ensemble.pt",
    }
    reasons = {form: refused_checkpoint(client, value) for form, value in forms.items()}
    assert set(reasons.values()) == {admission.OUTSIDE_ROOTS}, reasons
    assert queued(client) == 0


@pytest.mark.parametrize("checkpoint,reason", [
    ("/srv/ensemble\x00.pt", "NUL or other control characters"),
    ("/srv/" + "a" * 5000, "at most 4096 characters"),
    ("/srv/" + "a" * 300 + "/ensemble.pt", "longer than 255 bytes"),
    ("  ", "must name a file"),
    ("ensemble.pt", "must be an absolute path"),
    ("../outside/ensemble.pt", "must be an absolute path"),
    ("experiment:../../etc", "a reference to another experiment is"),
    ("experiment:abc/weights", "a reference to another experiment is"),
    ("experiment:no-such-experiment", "no experiment no-such-experiment"),
])
def test_malformed_checkpoints_are_refused_with_the_field_named(client, checkpoint, reason):
    assert reason in refused_checkpoint(client, checkpoint)
    assert queued(client) == 0


def test_a_missing_file_inside_a_root_says_so(client, roots):
    assert refused_checkpoint(client, str(roots["artifacts"] / "missing.pt")) == "no checkpoint file at this path"


def test_a_study_with_a_checkpoint_outside_the_roots_is_refused(client, roots):
    study = {"name": "s", "experiment": with_checkpoint(str(roots["outside"] / "ensemble.pt")),
             "grid": {"seed": [0, 1]}}
    assert problems(post(client, study, "/studies")) == [("experiment.base.checkpoint", admission.OUTSIDE_ROOTS)]
    varied = {"name": "s", "experiment": fake_spec(),
              "variants": {"mine": {}, "theirs": {"base.checkpoint": "/etc/passwd"}}}
    assert problems(post(client, varied, "/studies")) == [("experiments.s-theirs-igat.base.checkpoint",
                                                            admission.OUTSIDE_ROOTS)]
    assert client.get("/studies").json()["total"] == 0 and queued(client) == 0


def with_transfer_source(source: str, name: str = "transfer") -> dict:
    spec = fake_spec(name)
    spec["eval"] = {"attacks": ["natural", "transfer"], "transfer_from": source}
    return spec


def test_a_transfer_source_is_admitted_like_a_base_checkpoint(client, roots, sessions, settings):
    for given in (str(roots["outside"] / "ensemble.pt"), "/etc/passwd"):
        assert problems(post(client, with_transfer_source(given))) == [("eval.transfer_from", admission.OUTSIDE_ROOTS)]
    both = with_transfer_source(str(roots["outside"] / "ensemble.pt"))
    both["base"]["checkpoint"] = "relative.pt"
    assert [field for field, _ in problems(post(client, both))] == ["base.checkpoint", "eval.transfer_from"]
    assert queued(client) == 0
    base_id = succeeded_with_checkpoints(sessions, settings)
    run_dir = run_dir_of(Path(settings.artifact_root).resolve(), base_id)
    for given, stored in (("standard", "standard"), (f"experiment:{base_id}", str(run_dir / model_checkpoint("base"))),
                          (str(roots["data"] / ".." / "extra" / "ensemble.pt"), str(roots["extra"] / "ensemble.pt"))):
        r = post(client, with_transfer_source(given))
        assert r.status_code == 202, r.text
        assert r.json()["spec"]["eval"]["transfer_from"] == stored


# ---------------------------------------------------------------------------------------------- allowed


def test_checkpoints_inside_the_roots_are_accepted_and_stored_resolved(client, roots):
    (roots["artifacts"] / "link.pt").symlink_to(roots["data"] / "ensemble.pt")
    forms = {
        "artifact root": (roots["artifacts"] / "ensemble.pt", roots["artifacts"] / "ensemble.pt"),
        "data root": (roots["data"] / "ensemble.pt", roots["data"] / "ensemble.pt"),
        "operator's root": (roots["extra"] / "ensemble.pt", roots["extra"] / "ensemble.pt"),
        "../ staying inside": (roots["artifacts"] / ".." / "data" / "ensemble.pt", roots["data"] / "ensemble.pt"),
        "symlink into a root": (roots["artifacts"] / "link.pt", roots["data"] / "ensemble.pt"),
    }
    for i, (form, (given, stored)) in enumerate(forms.items()):
        r = post(client, with_checkpoint(str(given), name=f"allowed{i}"))
        assert r.status_code == 202, (form, r.text)
        assert r.json()["spec"]["base"]["checkpoint"] == str(stored.resolve()), form


def succeeded_with_checkpoints(sessions, settings, models: tuple[str, ...] = ("base", "igat")) -> str:
    with session_scope(sessions) as s:
        experiment, _ = store.create_experiment(s, spec=fake_spec("base"), name="base", priority=0)
        run_dir = run_dir_of(Path(settings.artifact_root).resolve(), experiment.id)
        store.transition(s, experiment.id, RUNNING, run_dir=str(run_dir))
        store.transition(s, experiment.id, SUCCEEDED)
    for model in models:
        (run_dir / model_checkpoint(model)).parent.mkdir(parents=True)
        (run_dir / model_checkpoint(model)).write_bytes(b"weights")
    return experiment.id


def test_another_experiments_checkpoint_by_reference_or_by_path(client, sessions, settings):
    """`experiment:<id>[/<model>]` resolves to that run's saved ensemble; a raw path into its run directory is inside
    the artifact root, so it is accepted too (the form the study planner writes into dependents)."""
    base_id = succeeded_with_checkpoints(sessions, settings)
    run_dir = run_dir_of(Path(settings.artifact_root).resolve(), base_id)
    for given, model in ((f"experiment:{base_id}", "base"), (f"experiment:{base_id}/igat", "igat"),
                         (str(run_dir / model_checkpoint("igat")), "igat")):
        r = post(client, with_checkpoint(given, name="dependent"))
        assert r.status_code == 202, r.text
        assert r.json()["spec"]["base"]["checkpoint"] == str(run_dir / model_checkpoint(model))
    assert refused_checkpoint(client, f"experiment:{base_id}/continued") == (
        f"experiment {base_id} has no continued checkpoint (it is succeeded)")


def test_study_dependents_point_inside_the_artifact_root(client, settings):
    study = {"name": "abl", "experiment": fake_spec(), "arms": {"igat": {}, "hard": {"igat.rule": "hard"}}}
    r = post(client, study, "/studies")
    assert r.status_code == 202, r.text
    dependent = next(run for run in r.json()["experiments"] if run["depends_on"])
    spec = client.get(f"/experiments/{dependent['id']}").json()["spec"]
    checkpoint = Path(spec["base"]["checkpoint"])
    assert checkpoint.is_absolute() and admission.inside_allowed_roots(checkpoint.resolve(), settings)
    assert checkpoint == run_dir_of(Path(settings.artifact_root).resolve(), dependent["depends_on"]) / (
        model_checkpoint("base"))


def test_study_dependents_share_the_standard_transfer_source_of_their_base_experiment(client, settings):
    study = {"name": "abl", "experiment": with_transfer_source("standard"),
             "arms": {"igat": {}, "hard": {"igat.rule": "hard"}}}
    r = post(client, study, "/studies")
    assert r.status_code == 202, r.text
    specs = {run["id"]: client.get(f"/experiments/{run['id']}").json()["spec"] for run in r.json()["experiments"]}
    trainer, dependent = (next(run for run in r.json()["experiments"] if bool(run["depends_on"]) is d)
                          for d in (False, True))
    assert specs[trainer["id"]]["eval"]["transfer_from"] == "standard"
    assert specs[dependent["id"]]["eval"]["transfer_from"] == str(
        run_dir_of(Path(settings.artifact_root).resolve(), trainer["id"]) / model_checkpoint("transfer_source"))


# -------------------------------------------------------------------------------------- values and sizes


@pytest.mark.parametrize("path,value,field", [
    (("base", "params", "alpha"), float("nan"), "base.params.alpha"),
    (("base", "params", "beta"), float("inf"), "base.params.beta"),
    (("igat", "alpha"), float("-inf"), "igat.alpha"),
    (("base", "train", "lr"), float("nan"), "base.train.lr"),
    (("tune", "alphas"), [1.0, float("nan")], "tune.alphas.1"),
])
def test_non_finite_numbers_are_refused_with_the_field_named(client, path, value, field):
    spec = fake_spec()
    spec["base"]["method"] = "adp"
    section = spec
    for key in path[:-1]:
        section = section.setdefault(key, {})
    section[path[-1]] = value
    [(found, reason)] = problems(post(client, spec))
    assert found == field and "finite number" in reason
    assert queued(client) == 0


def test_non_finite_numbers_in_a_study_are_refused_with_the_field_named(client):
    study = {"name": "s", "experiment": fake_spec(), "grid": {"igat.beta": [1.0, float("nan")]}}
    assert problems(post(client, study, "/studies")) == [("grid.igat.beta[1]", "must be a finite number, got nan")]


def test_unbounded_lists_and_strings_are_refused(client):
    spec = fake_spec()
    spec["base"]["train"]["milestones"] = list(range(1, 10_001))
    spec["base"]["checkpoint"] = "/" + "x" * 10_000
    found = dict(problems(post(client, spec)))
    assert "at most 256 items" in found["base.train.milestones"]
    assert "at most 4096 characters" in found["base.checkpoint"]


HUGE = {"ensemble": {"members": 64, "width": 4096}, "dataset": {"name": "cifar10"}}


def test_an_oversized_ensemble_is_refused_naming_the_numbers(client):
    found = problems(post(client, {**fake_spec(), **HUGE}))
    assert [field for field, _ in found] == ["ensemble", "ensemble"]
    assert found[0][1] == ("64 members x width 4096 of small_cnn on cifar10 is about 1.0e11 parameters (380 GiB in "
                           "float32); the limit is 1.0e9 (IGAT_MAX_PARAMETERS)")
    assert "TiB of float32 activations" in found[1][1] and "the limit is 64 GiB" in found[1][1]
    study = {"name": "s", "experiment": fake_spec(), "grid": {"ensemble.width": [8, 4096]},
             "variants": {"big": {"ensemble.members": 64, "dataset.name": "cifar10"}}}
    fields = {field for field, _ in problems(post(client, study, "/studies"))}
    assert fields == {"experiments.s-big-width4096-igat.ensemble"}
    assert queued(client) == 0


def test_the_operator_sets_the_size_limits(tmp_path, db_url, sessions):
    spec = {**fake_spec(), "ensemble": {"members": 8, "width": 64}}  # 8 x 392,906 parameters on digits
    tight = make_settings(tmp_path, db_url, max_parameters=3_000_000)
    with make_client(tight, sessions) as client:
        assert "the limit is 3.0e6 (IGAT_MAX_PARAMETERS)" in dict(problems(post(client, spec)))["ensemble"]
    loose = make_settings(tmp_path, db_url, max_parameters=4_000_000, max_activation_bytes=2**20)
    with make_client(loose, sessions) as client:
        assert "the limit is 1 MiB (IGAT_MAX_ACTIVATION_BYTES)" in dict(problems(post(client, spec)))["ensemble"]
    with make_client(make_settings(tmp_path, db_url, max_parameters=4_000_000), sessions) as client:
        assert post(client, spec).status_code == 202
