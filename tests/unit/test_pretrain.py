"""`rtrec pretrain`: offline training -> initial state the streaming trainer starts from."""

import dataclasses

import numpy as np
import torch

from flink_job.config import load_config
from models.online import train_and_maybe_export
from models.text_encoder import TextEncoder
from models.trainer import OnlineLearner, new_meta
from offline.stream import to_stream
from offline.training import pretrain, split_stream
from replay.datasets import synthetic


def small_cfg(tiny_bert_dir, *extra):
    return load_config(
        None,
        [
            f"model.text_encoder='{tiny_bert_dir}'",
            "model.dim=16",
            "model.history_length=8",
            "model.hidden=16",
            "replay.num_events=1500",
            "replay.num_items=80",
            "replay.malformed_fraction=0.0",
            "trainer.batch_size=64",
            *extra,
        ],
    )


def test_split_stream_keeps_items_in_order(tiny_bert_dir):
    cfg = small_cfg(tiny_bert_dir)
    stream = list(to_stream(synthetic(cfg.replay), cfg))
    warm, test = split_stream(stream, 0.2)
    assert warm + test == stream
    n = sum(1 for x in stream if hasattr(x, "target"))
    assert sum(1 for x in warm if hasattr(x, "target")) == int(0.2 * n)


def test_new_model_key_starts_from_the_pretrained_state(tiny_bert_dir, tmp_path):
    cfg = small_cfg(tiny_bert_dir)
    stream = list(to_stream(synthetic(cfg.replay), cfg))
    warm, test = split_stream(stream, 0.5)
    out = tmp_path / "init.pt"
    summary = pretrain(cfg, warm, out, progress=False)
    assert out.is_file() and summary["steps"] > 5

    job_cfg = dataclasses.replace(cfg.trainer, initial_state=str(out))
    enc = TextEncoder(tiny_bert_dir, device=torch.device("cpu"))
    learner = OnlineLearner(cfg.model, job_cfg, torch.device("cpu"), text_dim=enc.dim)
    meta = new_meta("default")
    samples = [x for x in test if hasattr(x, "target")][:64]
    firing = train_and_maybe_export(
        learner, meta, samples, lambda: None, lambda: (), 10, {}, encoder=enc
    )
    # The trainer continued from the pretrained step count and wrote the whole state.
    assert meta["step"] == summary["steps"] + 1 and meta["initial_state"] == str(out)
    assert len(firing.result.touched_items) >= summary["items"]
    assert set(learner.table.index) <= set(firing.result.touched_rows)
    assert firing.result.dense_blob is not None


def test_missing_initial_state_is_a_clear_error(tiny_bert_dir, tmp_path):
    cfg = small_cfg(tiny_bert_dir, f"trainer.initial_state='{tmp_path / 'nope.pt'}'")
    learner = OnlineLearner(cfg.model, cfg.trainer, torch.device("cpu"), text_dim=32)
    try:
        train_and_maybe_export(learner, new_meta("k"), [], lambda: None, lambda: (), 10, {})
    except FileNotFoundError as e:
        assert "rtrec pretrain" in str(e) and "trainer.initial_state" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_unfreezing_top_layers_fine_tunes_the_encoder(tiny_bert_dir, tmp_path):
    cfg = small_cfg(tiny_bert_dir, "replay.num_events=400")
    stream = list(to_stream(synthetic(cfg.replay), cfg))
    before = TextEncoder(tiny_bert_dir, device=torch.device("cpu"))
    text = ["A jazz piece about swing, club and blue."]
    summary = pretrain(cfg, stream, tmp_path / "ft.pt", unfreeze_top=1, lm_lr=1e-2, progress=False)
    after = TextEncoder(summary["text_encoder"], device=torch.device("cpu"))
    assert not np.allclose(before.encode(text), after.encode(text))
    # Only the top layer moved.
    b, a = before.model.state_dict(), after.model.state_dict()
    assert torch.equal(
        b["encoder.layer.0.attention.self.query.weight"],
        a["encoder.layer.0.attention.self.query.weight"],
    )
    assert not torch.equal(
        b["encoder.layer.1.attention.self.query.weight"],
        a["encoder.layer.1.attention.self.query.weight"],
    )
