"""Device selection: CUDA when present, CPU otherwise (``RTREC_DEVICE`` overrides)."""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    forced = os.environ.get("RTREC_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_cpu_threads(n: int) -> None:
    """Use ``n`` intra-op CPU threads in this process (kernels on CUDA are unaffected)."""
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
