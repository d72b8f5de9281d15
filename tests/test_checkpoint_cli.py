"""A bad checkpoint on the command line (`igat run` with base.checkpoint, `igat theory diagnose`) is one line naming
the file and the reason, and a non-zero exit code; never a traceback. Loading stays weights-only: a pickle that
would run code is refused as unreadable."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from igat_core.cli import app


class Payload:
    """Unpickling this would call print(): weights-only loading must refuse it."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {name: root / f"{name}.pt" for name in ("junk", "list", "keys", "format", "pickle")}
    files["junk"].write_text("not a checkpoint")
    torch.save([1, 2, 3], files["list"])
    torch.save({"weights": torch.zeros(2)}, files["keys"])
    torch.save({"format": "igat-ensemble/1", "members": 2}, files["format"])
    files["pickle"].write_bytes(pickle.dumps(Payload()))
    files["missing"] = root / "missing.pt"
    return files


REASONS = {
    "missing": "does not exist",
    "junk": "is not a readable PyTorch checkpoint",
    "list": "holds a list, not an ensemble",
    "keys": "has no 'model_<i>' entries",
    "format": "is not a usable ensemble checkpoint (KeyError: 'model')",
    "pickle": "is not a readable PyTorch checkpoint (UnpicklingError: Weights only load failed",
}
DIAGNOSE_REASONS = {**REASONS, "list": "is not a usable ensemble checkpoint (not an igat ensemble checkpoint (it holds "
                    "a list))", "keys": "is not a usable ensemble checkpoint (not an igat ensemble checkpoint (format "
                    "None))"}


def one_line_error(result, path: str, reason: str) -> None:
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "code ran" not in result.output
    [line] = [line for line in result.output.splitlines() if path in line]
    assert reason in line, line


def spec_file(tmp_path: Path, checkpoint: str) -> Path:
    spec = {"name": "loaded", "dataset": {"name": "digits", "train_limit": 64},
            "ensemble": {"members": 2, "width": 4}, "base": {"checkpoint": checkpoint},
            "igat": {"train": {"epochs": 1, "batch_size": 64, "lr": 0.01}},
            "eval": {"n_examples": 8, "sanity_examples": 0, "diagnostics_examples": 0},
            "resources": {"device": "cpu", "threads": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", list(REASONS))
def test_igat_run_with_a_bad_base_checkpoint_is_one_line(bad, tmp_path, name):
    path = str(bad[name])
    result = CliRunner().invoke(app, ["run", str(spec_file(tmp_path, path)), "--out", str(tmp_path / "run"), "--quiet"])
    one_line_error(result, path, REASONS[name])
    assert result.output.strip().splitlines()[-1].startswith(f"igat run failed: checkpoint {path} {REASONS[name]}")


def test_igat_run_with_an_experiment_reference_says_that_the_service_resolves_it(tmp_path):
    result = CliRunner().invoke(app, ["run", str(spec_file(tmp_path, "experiment:abc")), "--out", str(tmp_path / "r"),
                                      "--quiet"])
    one_line_error(result, "experiment:abc", "names an experiment of the service")


@pytest.mark.parametrize("name", list(DIAGNOSE_REASONS))
def test_theory_diagnose_with_a_bad_checkpoint_is_one_line(bad, name):
    path = str(bad[name])
    result = CliRunner().invoke(app, ["theory", "diagnose", path, "--n-examples", "4"])
    one_line_error(result, path, DIAGNOSE_REASONS[name])
    assert result.exit_code == 2
