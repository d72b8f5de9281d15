"""The process settings that change a run's arithmetic, applied the same way wherever a spec runs.

torch splits a reduction (a weight gradient summed over the batch) across its intra-op threads, so one training
step with 1 and with 2 threads gives weights that differ in the last bits, and training grows that into different
accuracies. `igat run` (also what the service's local executor starts), the Ray Job's runner (its in-driver
evaluation included) and every Ray Train worker therefore train and evaluate with `resources.threads` threads
(`torch_threads`), and results.json `runtime` records what the evaluating process used (`runtime_record`).
The inter-op pool is recorded, not set: it schedules independent ops and changes no sum, and torch refuses to
resize it once any parallel work has run.

Convolutional members can keep their weights and inputs channels_last (NHWC) (`channels_last_members`,
resources.channels_last): on the CPU that runs oneDNN's NHWC kernels, faster than the NCHW path, with the same
results up to float round-off (the kernels sum in another order), which training and PGD's signed steps grow, like
the thread count, into other numbers. It is off by default, so that a spec's committed results reproduce.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


def runtime_record(device: torch.device) -> dict[str, object]:
    """This process's settings that decide the arithmetic (results.json `runtime`)."""
    return {
        "threads": torch.get_num_threads(),
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
