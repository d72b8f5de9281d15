"""`igat_core.runtime`: usable_cpus, the affinity mask under the cgroup CPU quota, read from files laid out as the
kernel lays them out (cgroup v2 and v1); the runner's word when resources.threads exceeds it; the CPU in the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from igat_core.runtime import cgroup_cpu_quota, usable_cpus
from tests.service_fixtures import ROOT, TINY_EXPERIMENT


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_and_its_ancestors_caps_the_affinity(tmp_path):
    root = tmp_path / "cgroup"
    write(tmp_path / "self", "0::/kubepods/pod1/ctr\n")
    write(root / "kubepods" / "cpu.max", "max 100000\n")
    write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")  # 1.5 CPUs: 2 threads' worth
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(root / "kubepods" / "pod1") == 1.5
    assert cgroup_cpu_quota(root / "kubepods") is None
    affinity = usable_cpus(Path("/nonexistent"), root)
    assert usable_cpus(tmp_path / "self", root) == min(2, affinity)
    write(root / "kubepods" / "cpu.max", "50000 100000\n")  # an ancestor's half CPU is the tightest
    assert usable_cpus(tmp_path / "self", root) == 1


def test_cgroup_v1_cfs_quota_and_an_unlimited_one(tmp_path):
    root = tmp_path / "cgroup"
    write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "100000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert usable_cpus(tmp_path / "self", root) == 1
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert usable_cpus(tmp_path / "self", root) == usable_cpus(Path("/nonexistent"), root)


def test_the_affinity_mask_counts_and_a_run_says_when_its_threads_oversubscribe_it(tmp_path):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    spec = {**TINY_EXPERIMENT, "name": "oversubscribed", "resources": {"device": "cpu", "threads": 2}}
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
from igat_core.runner import Runner
from igat_core.spec import parse_spec
Runner(parse_spec({spec!r}), {str(tmp_path / "run")!r}, progress=False).run()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    said = [e for e in events if e["event"] == "oversubscribed"]
    assert len(said) == 1 and said[0]["threads"] == 2 and said[0]["usable_cpus"] == 1, said
    runtime = json.loads((tmp_path / "run" / "results.json").read_text())["runtime"]
    assert runtime["threads"] == 2 and runtime["usable_cpus"] == 1


def test_the_runtime_record_names_the_cpu_and_the_kernel_level_that_decide_the_round_off():
    script = "from igat_core.runtime import runtime_record; import torch, json; " \
             "print(json.dumps(runtime_record(torch.device('cpu'))))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    default = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                        check=True).stdout)
    capped = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                       env={**env, "ATEN_CPU_CAPABILITY": "default"}).stdout)
    assert default["cpu"] and default["cpu"] == capped["cpu"]
    assert capped["cpu_capability"] == "DEFAULT"
    assert default["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
