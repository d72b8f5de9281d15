"""The process settings that change a run's arithmetic, applied the same way wherever a spec runs.

torch splits a reduction (a weight gradient summed over the batch) across its intra-op threads, so one training
step with 1 and with 2 threads gives weights that differ in the last bits, and training grows that into different
accuracies. `igat run` (also what the service's local executor starts), the Ray Job's runner (its in-driver
evaluation included) and every Ray Train worker therefore train and evaluate with `resources.threads` threads
(`torch_threads`), and results.json `runtime` records what the evaluating process used (`runtime_record`).
The inter-op pool is recorded, not set: it schedules independent ops and changes no sum, and torch refuses to
resize it once any parallel work has run. The CPU's instruction set picks the kernels (ATen's dispatch level,
oneDNN's ISA), and so the round-off: the same spec on an AVX2 and an AVX-512 machine trains to other numbers, so
the record names both the CPU and the level. Nor is the thread count lowered to the CPUs the process may actually
use (`usable_cpus`: its affinity mask under its cgroup's CPU quota), as that would change the numbers; the record
holds both, and the runner says when the threads oversubscribe those CPUs.

Convolutional members can keep their weights and inputs channels_last (NHWC) (`channels_last_members`,
resources.channels_last): on the CPU that runs oneDNN's NHWC kernels, faster than the NCHW path, with the same
results up to float round-off (the kernels sum in another order), which training and PGD's signed steps grow, like
the thread count, into other numbers. It is off by default, so that a spec's committed results reproduce.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` inside the block and restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on: its affinity mask, capped by the tightest CPU quota (cgroup v2 cpu.max,
    v1 cpu.cfs_quota_us / cpu.cfs_period_us) of its cgroup and the cgroup's ancestors."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas = [quota for directory in cgroup_cpu_dirs(proc_cgroup, cgroup_root)
              if (quota := cgroup_cpu_quota(directory)) is not None]
    return max(1, min([count, *(math.ceil(q) for q in quotas)]))


def cgroup_cpu_dirs(proc_cgroup: Path, cgroup_root: Path) -> list[Path]:
    """The directories of this process's CPU cgroup (v2 unified, or v1 cpu controller) and their ancestors."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = cgroup_root
        elif "cpu" in controllers.split(","):
            base = next((d for d in (cgroup_root / controllers, cgroup_root / "cpu,cpuacct", cgroup_root / "cpu")
                         if d.is_dir()), None)
            if base is None:
                continue
        else:
            continue
        leaf = base / path.lstrip("/")
        dirs += [leaf, *[p for p in leaf.parents if p.is_relative_to(base)]]
    return dirs


def cgroup_cpu_quota(directory: Path) -> float | None:
    """CPUs' worth of time the cgroup at `directory` may use, None without a limit."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        return None if quota_us < 0 else quota_us / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


_CHANNELS_LAST = [False]


def channels_last_default() -> bool:
    """Whether an ensemble built now keeps its convolutional members channels_last (`channels_last_members`)."""
    return _CHANNELS_LAST[0]


@contextmanager
def channels_last_members(enabled: bool) -> Iterator[None]:
    """Ensembles built inside the block keep convolutional members channels_last when `enabled`."""
    previous = _CHANNELS_LAST[0]
    _CHANNELS_LAST[0] = enabled
    try:
        yield
    finally:
        _CHANNELS_LAST[0] = previous


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_record(device: torch.device) -> dict[str, object]:
    """This process's settings that decide the arithmetic (results.json `runtime`)."""
    return {
        "threads": torch.get_num_threads(),
        "usable_cpus": usable_cpus(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "channels_last": channels_last_default(),
    }
