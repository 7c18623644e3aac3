"""key_by(user) -> window -> this function: per-user history in keyed state -> samples."""

from __future__ import annotations

import pickle

from pyflink.common import Time, Types
from pyflink.datastream import ProcessWindowFunction
from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor

from models.config import UserStageConfig
from models.history import advance_user
from udfs.records import row_to_event, sample_to_row


class UserWindowFunction(ProcessWindowFunction):
    """Applies one window of a user's events to the user's state and emits one sample per event."""

    def __init__(self, cfg: UserStageConfig, history_length: int, model_key: str) -> None:
        self.cfg = cfg
        self.history_length = history_length
        self.model_key = model_key
        self.descriptor = None

    def open(self, runtime_context):
        desc = ValueStateDescriptor("user", Types.PICKLED_BYTE_ARRAY())
        ttl_ms = int(self.cfg.state_ttl_hours * 3600 * 1000)
        if ttl_ms > 0:
            desc.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(ttl_ms))
                .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
                .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
                .build()
            )
        self.descriptor = desc

    def process(self, key, context, elements):
        state = context.global_state().get_state(self.descriptor)
        raw = state.value()
        user = pickle.loads(raw) if raw is not None else None
        user, samples = advance_user(
            user, [row_to_event(r) for r in elements], self.cfg, self.history_length, self.model_key
        )
        state.update(pickle.dumps(user, protocol=pickle.HIGHEST_PROTOCOL))
        for s in samples:
            yield sample_to_row(s)
