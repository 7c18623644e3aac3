"""Restoring state written by another release: additive changes migrate, the rest fails at
the first use with a message that names the state, the format and what to do."""

import copy
import io
import pickle

import pytest
import torch

from models.config import ModelConfig, TrainerConfig, UserStageConfig
from models.history import UserState, advance_user
from models.online import train_and_maybe_export
from models.state_format import StateFormatError
from models.trainer import DENSE_FORMAT, META_FORMAT, OnlineLearner, _tensors_to, new_meta
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=8, history_length=4, hidden=16)
TC = TrainerConfig(batch_size=16, export_every_steps=1000)


def learner() -> OnlineLearner:
    return OnlineLearner(MC, TC, torch.device("cpu"))


def fire(lr: OnlineLearner, meta: dict, dense: bytes | None = None, samples=None):
    return train_and_maybe_export(
        lr, meta, samples or topic_samples(16), lambda: dense, lambda: (), 10, {}
    )


def test_meta_of_an_older_release_gets_new_keys_and_trains_on():
    old = new_meta("m")
    dropped = {k: old.pop(k) for k in ("recall10_ema", "targets_without_text", "oov")}
    # As the Flink state holds it: pickled by the older release.
    meta = pickle.loads(pickle.dumps(old))
    firing = fire(learner(), meta)
    assert meta["format"] == META_FORMAT
    assert set(dropped) <= set(meta)
    assert meta["step"] == 1 and firing.result.dense_blob is not None


@pytest.mark.parametrize("found", [0, None, META_FORMAT + 1])
def test_meta_format_without_migration_fails_with_what_to_do(found):
    meta = new_meta("shop-eu")
    if found is None:
        del meta["format"]
    else:
        meta["format"] = found
    with pytest.raises(StateFormatError) as e:
        fire(learner(), meta)
    msg = str(e.value)
    assert f"state format {found!r}" in msg and f"reads format {META_FORMAT}" in msg
    assert "'shop-eu'" in msg
    assert ("newer release" in msg) == (found == META_FORMAT + 1)
    assert "savepoint" in msg


def test_dense_blob_of_another_format_fails_clearly():
    lr = learner()
    meta = new_meta("m")
    blob = fire(lr, meta).result.dense_blob
    obj = pickle.loads(blob)
    obj["format"] = 1
    with pytest.raises(StateFormatError, match=r"dense trainer state has state format 1"):
        fire(learner(), meta, dense=pickle.dumps(obj))


def _as_torch_save(blob: bytes, fmt: int) -> bytes:
    """A format-5 dense blob rewritten the way releases up to format 4 stored it."""
    obj = _tensors_to(pickle.loads(blob), torch.from_numpy)
    obj["format"] = fmt
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_dense_blob_of_format_3_fails_clearly():
    """Format 3 (before the blend weights) has no migration: a clear StateFormatError."""
    lr = learner()
    meta = new_meta("m")
    blob = fire(lr, meta).result.dense_blob
    assert pickle.loads(blob)["format"] == DENSE_FORMAT == 5
    with pytest.raises(StateFormatError, match=r"state format 3, this release reads format 5"):
        fire(learner(), meta, dense=_as_torch_save(blob, 3))


def test_dense_blob_of_format_4_is_read_and_learns_the_same():
    """Format 4 (torch.save of the same content) is still read: a learner restored from it
    takes the same next step as one restored from the format-5 blob."""
    meta = new_meta("m")
    blob = fire(learner(), meta).result.dense_blob
    old = fire(learner(), copy.deepcopy(meta), dense=_as_torch_save(blob, 4)).result.dense_blob
    new = fire(learner(), copy.deepcopy(meta), dense=blob).result.dense_blob
    assert old == new


def test_user_state_of_another_format_fails_clearly():
    st = UserState()
    st.format = 0
    with pytest.raises(StateFormatError, match=r"user history state has state format 0.*savepoint"):
        advance_user(st, [], UserStageConfig(), 4, "m")
