"""Format numbers of the job's keyed state, and the error for one this release cannot read.

Every piece of keyed state the job writes carries a format number (the trainer's ``meta``,
the dense blob, the per-user state). This release reads exactly the formats it writes: a
restored value of any other format stops the job with a :class:`StateFormatError` that
names the state, the format found and what to do.
"""

from __future__ import annotations


class StateFormatError(ValueError):
    """Restored state has a format this release cannot read."""


def format_error(what: str, found: object, reads: int, key: str = "") -> StateFormatError:
    """The error for state ``what`` (of model key ``key``) of format ``found``, where this
    release reads format ``reads``."""
    where = f" of model key {key!r}" if key else ""
    if type(found) is int and found > reads:
        todo = (
            "it was written by a newer release: run that release (or newer), or restore from "
            "a savepoint taken before the upgrade"
        )
    else:
        todo = (
            "no release writes that format: restore from a savepoint written by this "
            "release, or start a new model key (job.model_key) and warm it up with "
            "`rtrec pretrain`"
        )
    return StateFormatError(
        f"{what}{where} has state format {found!r}, this release reads format {reads}; {todo}"
    )


def check_format(what: str, found: object, reads: int, key: str = "") -> None:
    """Raise :func:`format_error` unless ``found`` is format ``reads``."""
    if type(found) is not int or found != reads:
        raise format_error(what, found, reads, key)
