"""Versioned trainer state: what a restored savepoint may contain and how it is upgraded.

Every piece of keyed state the job writes carries a format number (the trainer's ``meta``,
the dense blob, the per-user state). On restore:

- keys added to ``meta`` since the state was written get their defaults (additive changes
  keep the format number, so savepoints of older releases keep working);
- an older format with a registered migration is upgraded in place, step by step;
- an older format without one, or a newer format, stops the trainer with a
  :class:`StateFormatError` that names the state, the format found and what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class StateFormatError(ValueError):
    """Restored state has a format this release cannot read."""


def format_error(what: str, found: object, reads: int, key: str = "") -> StateFormatError:
    where = f" of model key {key!r}" if key else ""
    if isinstance(found, int) and found > reads:
        todo = (
            "it was written by a newer release: run that release (or newer), or restore from "
            "a savepoint taken before the upgrade"
        )
    else:
        todo = (
            "no migration exists: restore from a savepoint written by a release that writes "
            f"format {reads}, or start a new model key (job.model_key) and warm it up with "
            "`rtrec pretrain`"
        )
    return StateFormatError(
        f"{what}{where} has state format {found!r}, this release reads format {reads}; {todo}"
    )


def migrate_meta(
    meta: dict[str, Any],
    current: int,
    defaults: dict[str, Any],
    migrations: dict[int, Callable[[dict[str, Any]], None]],
) -> list[str]:
    """Upgrade a restored trainer ``meta`` in place to format ``current``.

    ``migrations[n]`` turns format ``n`` into ``n + 1``; ``defaults`` fills keys the state
    predates. Returns the keys that were filled in (for a log line).
    """
    found = meta.get("format")
    key = str(meta.get("model_key", ""))
    if not isinstance(found, int) or found > current:
        raise format_error("trainer meta state", found, current, key)
    while found < current:
        step = migrations.get(found)
        if step is None:
            raise format_error("trainer meta state", found, current, key)
        step(meta)
        found += 1
        meta["format"] = found
    added = [k for k in defaults if k not in meta]
    for k in added:
        meta[k] = defaults[k]
    return added
