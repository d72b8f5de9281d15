"""bench/attack_cost.py: the ratios to the reference are the per-repetition medians and the mean gradients, by
hand; its section in a Markdown file is replaced for the same command and kept for another; the first case is
PGD-20 and every case builds an attack inside the eps ball on a tiny ensemble."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from bench.attack_cost import CASES, SECTION_END, SECTION_START, Target, render, summarize
from bench.pgd_throughput import build, write_section


def test_ratios_are_medians_of_per_repetition_ratios_and_gradients_are_means():
    # (seconds, gradients per example, accuracy) per repetition; reference first, 10 examples
    runs = {"pgd": [(1.0, 20.0, 50.0), (2.0, 20.0, 50.0), (1.0, 20.0, 50.0)],
            "mora": [(3.0, 100.0, 40.0), (4.0, 110.0, 42.0), (5.0, 90.0, 44.0)]}
    pgd, mora = summarize(runs, n=10)
    assert (pgd["time_ratio"], pgd["gradient_ratio"], pgd["seconds"]) == (1.0, 1.0, 0.1)
    # per-repetition ratios 3, 2, 5: median 3; seconds: median 4 over 10 examples; gradients: mean 100 / 20
    assert (mora["time_ratio"], mora["seconds"], mora["gradients"]) == (3.0, 0.4, 100.0)
    assert (mora["gradient_ratio"], mora["accuracy"]) == (5.0, pytest.approx(42.0))
    table = render({"rows": [pgd, mora], "setting": "s", "natural": 90.0}, "cmd")
    assert "| mora | 400.00 | 3.00 | 100.0 | 5.00 | 42.0 |" in table.splitlines()


def test_the_section_keeps_one_block_per_command(tmp_path: Path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nkept\n")
    for block in ("`a`\n\nfirst", "`b`\n\nother", "`a`\n\nsecond"):
        write_section(path, block, SECTION_START, SECTION_END, "## intro")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n\n" + SECTION_START) and text.endswith(SECTION_END + "\n")
    assert "first" not in text and text.index("other") < text.index("second")


def test_every_case_attacks_inside_the_ball_with_pgd_20_first():
    args = argparse.Namespace(arch="small_cnn", members=2, dataset="digits", device="cpu", epochs=0)
    model, _ = build("small_cnn", 2, "digits", torch.device("cpu"))
    target = Target(model, 0.1, args)
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = model(images).argmax(dim=1)
    first = CASES[0][1](target, torch.Generator().manual_seed(0))
    assert (first.name, first.steps) == ("pgd", 20)
    for _, make in CASES:
        attack = make(target, torch.Generator().manual_seed(0))
        attack(images, labels)
        assert attack.raw_bounds is not None and attack.raw_bounds.within_eps and attack.raw_bounds.within_range
        assert attack.cost is not None and attack.cost.min() >= 1
