"""Device selection: CUDA when present, CPU otherwise (``RTREC_DEVICE`` overrides).

torch is imported by the calls, not by this module: the parsing stages' Python worker
imports it (through the embedding stage) without needing torch until a catalogue batch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
