"""models.device: device choice and deterministic kernels (trainer.deterministic on a GPU).

On a GPU, PyTorch's default CUDA kernels (atomic scatter-adds) make the deterministic-mode
replay differ run to run; ``deterministic_kernels`` makes it identical, for every loss and
optimizer (benchmarks/gpu.py checks it on a GPU). These tests check the switch itself
and that every trainer firing goes through it; they need no GPU.
"""

import contextlib
import os

import pytest
import torch

import models.online as online
from models.config import ModelConfig, TrainerConfig
from models.device import CUBLAS_DETERMINISTIC, deterministic_kernels, pick_device
from models.trainer import OnlineLearner, new_meta
from tests.unit.helpers import topic_samples


def test_rtrec_device_overrides_the_choice(monkeypatch):
    monkeypatch.setenv("RTREC_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.delenv("RTREC_DEVICE")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == want


def test_deterministic_kernels_on_cuda_only_and_put_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    for device, enabled in ((torch.device("cpu"), True), (torch.device("cuda"), False)):
        with deterministic_kernels(device, enabled):
            assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError), deterministic_kernels(torch.device("cuda"), True):
        assert torch.are_deterministic_algorithms_enabled()
        # cuBLAS needs a fixed workspace for deterministic results (CUDA's documented value).
        assert CUBLAS_DETERMINISTIC == ":4096:8"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
        raise ValueError("the setting must be put back even when the block fails")
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("deterministic", [True, False])
def test_every_firing_asks_for_deterministic_kernels_in_deterministic_mode(
    monkeypatch, deterministic
):
    asked: list[tuple[torch.device, bool]] = []

    def spy(device, enabled):
        asked.append((device, enabled))
        return contextlib.nullcontext()

    monkeypatch.setattr(online, "deterministic_kernels", spy)
    learner = OnlineLearner(
        ModelConfig(dim=8, text_encoder="none"),
        TrainerConfig(batch_size=16, deterministic=deterministic),
        device=torch.device("cpu"),
    )
    meta = new_meta("default")
    for batch in (topic_samples(16, seed=1), topic_samples(16, seed=2)):
        online.train_and_maybe_export(learner, meta, batch, lambda: None, lambda: (), 5, {})
    assert asked == [(torch.device("cpu"), deterministic)] * 2


def test_eval_and_pretrain_steps_ask_for_them_too(monkeypatch):
    """`rtrec eval` and `rtrec pretrain` call prequential_step without a firing."""
    import models.metrics as metrics

    asked: list[bool] = []
    monkeypatch.setattr(
        metrics,
        "deterministic_kernels",
        lambda device, enabled: asked.append(enabled) or contextlib.nullcontext(),
    )
    learner = OnlineLearner(
        ModelConfig(dim=8, text_encoder="none"),
        TrainerConfig(batch_size=16, deterministic=True),
        device=torch.device("cpu"),
    )
    metrics.prequential_step(learner, new_meta("m"), topic_samples(16, seed=3))
    assert asked == [True]


@pytest.mark.parametrize(
    ("gpu", "available", "want"),
    [
        (True, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider"]),
        # onnxruntime-gpu lists CUDA on a machine without a usable GPU
        (False, ["CUDAExecutionProvider", "CPUExecutionProvider"], []),
        # the CPU build of onnxruntime (the H200 image's) on a GPU machine
        (True, ["AzureExecutionProvider", "CPUExecutionProvider"], []),
    ],
)
def test_serving_runs_onnx_on_cuda_only_when_both_are_there(monkeypatch, gpu, available, want):
    import models.serving as serving

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(serving.ort, "get_available_providers", lambda: available)
    assert serving.providers() == [*want, "CPUExecutionProvider"]
    # Asked for the CPU (gpu.py's baseline row), a usable GPU is left out.
    assert serving.providers(gpu=False) == ["CPUExecutionProvider"]
