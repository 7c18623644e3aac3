"""Device selection: CUDA when present, CPU otherwise (``RTREC_DEVICE`` overrides).

torch is imported by the calls, not by this module: the parsing stages' Python worker
imports it (through the embedding stage) without needing torch until a catalogue batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# cuBLAS picks its reduction order per call unless its workspace is fixed; PyTorch refuses
# deterministic mode on CUDA without this setting. 8 buffers of 4 MiB, as CUDA documents.
CUBLAS_DETERMINISTIC = ":4096:8"


def pick_device() -> torch.device:
    import torch

    forced = os.environ.get("RTREC_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_cpu_threads(n: int) -> None:
    """Use ``n`` intra-op CPU threads in this process (kernels on CUDA are unaffected)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device, enabled: bool) -> Iterator[None]:
    """Run the block with PyTorch's deterministic kernels when ``enabled`` on a CUDA device.

    Why: on a GPU, scatter-adds (the backward of embedding lookups and ``index_add_``) sum
    with atomics in whatever order the threads finish, so the same batch on the same state
    gives a model that differs in its last bits from run to run; ``trainer.deterministic``
    promises the same model from the same input, and a replay after a restore depends on
    it. CPU kernels here are already run-to-run identical, so on the CPU (or when not
    ``enabled``) the block runs unchanged. The setting is process-wide in PyTorch and is
    put back as it was when the block ends.
    """
    import torch

    if not enabled or device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
