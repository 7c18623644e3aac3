"""State formats: this release reads the formats it writes; any other format fails at the
first use with a message that names the state, the format found and what to do."""

import pickle

import pytest
import torch

from models.config import ModelConfig, TrainerConfig, UserStageConfig
from models.events import Event
from models.history import USER_STATE_FORMAT, UserState, advance_user
from models.online import train_and_maybe_export
from models.state_format import StateFormatError, check_format
from models.trainer import DENSE_FORMAT, META_FORMAT, OnlineLearner, new_meta
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=8, history_length=4, hidden=16)
# The gate's state has its own format and restore tests (test_gate.py).
TC = TrainerConfig(batch_size=16, export_every_steps=1000, publish_gate=False)


def learner() -> OnlineLearner:
    return OnlineLearner(MC, TC, torch.device("cpu"))


def fire(lr: OnlineLearner, meta: dict, dense: bytes | None = None, samples=None):
    return train_and_maybe_export(
        lr, meta, samples or topic_samples(16), lambda: dense, lambda: (), 10, {}
    )


def assert_says_what_to_do(msg: str, what: str, found: object, reads: int) -> None:
    assert f"{what} " in msg
    assert f"state format {found!r}, this release reads format {reads}" in msg
    if isinstance(found, int) and found > reads:
        assert "newer release" in msg and "savepoint" in msg
    else:
        assert "savepoint written by this release" in msg and "job.model_key" in msg


def test_formats_start_at_1_and_state_of_this_release_restores():
    assert (META_FORMAT, DENSE_FORMAT, USER_STATE_FORMAT) == (1, 1, 2)
    meta = new_meta("m")
    blob = fire(learner(), meta).result.dense_blob
    assert blob is not None and pickle.loads(blob)["format"] == DENSE_FORMAT
    # As the Flink state holds them: pickled, then read by a new instance.
    restored = pickle.loads(pickle.dumps(meta))
    fire(learner(), restored, dense=blob)
    assert restored["format"] == META_FORMAT and restored["step"] == 2


@pytest.mark.parametrize("found", [0, None, "1", True, META_FORMAT + 1])
def test_meta_of_another_format_fails_with_what_to_do(found):
    meta = new_meta("shop-eu")
    if found is None:
        del meta["format"]
    else:
        meta["format"] = found
    with pytest.raises(StateFormatError) as e:
        fire(learner(), meta)
    msg = str(e.value)
    assert_says_what_to_do(msg, "trainer meta state", found, META_FORMAT)
    assert "of model key 'shop-eu'" in msg


@pytest.mark.parametrize("found", [0, DENSE_FORMAT + 1])
def test_dense_blob_of_another_format_fails_with_what_to_do(found):
    meta = new_meta("m")
    obj = pickle.loads(fire(learner(), meta).result.dense_blob)
    obj["format"] = found
    with pytest.raises(StateFormatError) as e:
        fire(learner(), meta, dense=pickle.dumps(obj))
    assert_says_what_to_do(str(e.value), "dense trainer state", found, DENSE_FORMAT)


@pytest.mark.parametrize("found", [0, USER_STATE_FORMAT + 1])
def test_user_state_of_another_format_fails_with_what_to_do(found):
    st = UserState()
    st.format = found
    with pytest.raises(StateFormatError) as e:
        advance_user(st, [], UserStageConfig(), 4, "m")
    assert_says_what_to_do(str(e.value), "user history state", found, USER_STATE_FORMAT)


def test_user_state_of_format_1_is_read_with_its_positives_as_context():
    # A format-1 state as a savepoint holds it: pickled without the context field.
    old = UserState(history=["a", "b"], events=3)
    old.format = 1
    del old.__dict__["context"]
    st, samples = advance_user(
        pickle.loads(pickle.dumps(old)),
        [Event("e9", "u", "c", "rating", 5, 1.0)],
        UserStageConfig(),
        4,
        "m",
    )
    assert st.format == USER_STATE_FORMAT
    assert samples[0].events == ("a", "b") and samples[0].history == ("a", "b")
    assert st.context == ["a", "b", "c"] and st.history == ["a", "b"]


def test_check_format_accepts_only_the_current_format():
    check_format("some state", 3, 3)
    for found in (2, 4, 3.0, "3", None):
        with pytest.raises(StateFormatError, match="some state has state format"):
            check_format("some state", found, 3)
