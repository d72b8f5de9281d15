"""`igat eval CHECKPOINT --out DIR`: tables on stdout, results.json with evaluation["model"][combiner][attack],
the dataset from the checkpoint (or its shape), and a clear message with exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from igat_core.cli import app

FAST = {"signhunter_queries": 40, "sanity_examples": 8, "sanity_pgd_steps": 10, "sanity_pgd_restarts": 1,
        "steps": 5, "eps_sweep_attack": "pgd", "eps_sweep_values": [0.05, 0.1]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(trained_ensemble, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    payload = trained_ensemble.checkpoint_payload()
    torch.save(payload, root / "old.pt")
    payload["model"] = {**payload["model"], "dataset": "digits"}
    torch.save(payload, root / "ensemble.pt")
    (root / "fast.yaml").write_text(yaml.safe_dump({"eval": FAST}))
    (root / "junk.pt").write_text("not a checkpoint")
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_eval_prints_tables_and_writes_results(checkpoints, tmp_path):
    out = tmp_path / "eval"
    result = invoke(checkpoints / "ensemble.pt", "--out", out, "--attacks", "natural,pgd", "--attacks", "signhunter",
                    "--eps", "0.1", "--n-examples", "24", "--eps-sweep", "--baseline", checkpoints / "old.pt",
                    "--config", checkpoints / "fast.yaml", "--quiet")
    assert result.exit_code == 0, result.output
    assert "Table 1" in result.output and "average PGD" in result.output and "max SH" in result.output
    assert "Table 2" in result.output and "model vs baseline" in result.output
    results = json.loads((out / "results.json").read_text())
    evaluation = results["evaluation"]
    assert evaluation["n_examples"] == 24 and evaluation["eps"] == pytest.approx(0.1)
    assert set(evaluation["model"]) == {"average", "max"}
    assert set(evaluation["model"]["max"]) == {"natural", "pgd", "signhunter", "union"}
    assert results["improvement"]["average"]["pgd"] == pytest.approx(0.0)
    assert evaluation["eps_sweep"]["eps"] == pytest.approx([0.05, 0.1])
    assert results["spec"]["eval"]["step"] == pytest.approx(0.025)
    assert any(name.startswith("model.pgd_converged") for name in results["sanity"])
    assert (out / "report.md").is_file() and (out / "plots/accuracy_vs_eps.png").is_file()


def test_eval_infers_the_dataset_of_an_old_checkpoint(checkpoints, tmp_path):
    result = invoke(checkpoints / "old.pt", "--out", tmp_path, "--attacks", "natural", "--combiner", "max",
                    "--n-examples", "10", "--quiet")
    assert result.exit_code == 0, result.output
    assert "matches 'digits'" in result.output
    assert set(json.loads((tmp_path / "results.json").read_text())["evaluation"]["model"]) == {"max"}


@pytest.mark.parametrize("args,message", [
    (["missing.pt"], "does not exist"),
    (["junk.pt"], "is not a readable PyTorch checkpoint"),
    (["ensemble.pt", "--attacks", "pgd,deepfool"], "eval.attacks"),
    (["ensemble.pt", "--combiner", "median"], "--combiner"),
    (["ensemble.pt", "--eps", "2"], "eval.eps"),
    (["ensemble.pt", "--eps", "eight"], "eval.eps"),
    (["ensemble.pt", "--n-examples", "0"], "eval.n_examples"),
    (["ensemble.pt", "--dataset", "mnist5k"], "mnist5k has 1x28x28"),
    (["ensemble.pt", "--dataset", "imagenet"], "unknown dataset"),
    (["ensemble.pt", "--config", "missing.yaml"], "missing.yaml"),
])
def test_bad_input_is_a_clear_message_with_exit_code_2(checkpoints, tmp_path, args, message):
    args = [str(checkpoints / a) if a.endswith((".pt", ".yaml")) else a for a in args]
    result = invoke(args[0], "--out", tmp_path, *args[1:])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
