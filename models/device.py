"""Device selection: CUDA when present, CPU otherwise (``RTREC_DEVICE`` overrides)."""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    forced = os.environ.get("RTREC_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
