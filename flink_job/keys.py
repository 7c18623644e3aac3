"""The key that pseudonymises user ids (models.events.pseudonymise): where it comes from.

There is no usable default: a key everybody knows lets anyone reverse the pseudonyms by
hashing candidate ids. In order, the key is

1. the contents of ``job.hmac_key_file`` (a deployment keeps it readable by the job's user
   only; a file others can read gets a warning),
2. the environment variable ``RTREC_HMAC_KEY``,
3. for local runs only (``rtrec run``, ``demo``, ``eval``...), a random key generated once
   per installation under ``.rtrec/hmac.key`` with mode 0600, announced once.

``rtrec submit`` and the cluster entry point (flink_job/main.py) call
:func:`require_deployment_key`, which refuses to go on without 1 or 2. The key is never
part of the configuration (so not of `rtrec config`, manifests or metrics); it reaches
the Python workers inside the parse stage's function in the job graph.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from pathlib import Path

from flink_job.config import AppConfig, ConfigError

log = logging.getLogger(__name__)
KEY_ENV = "RTREC_HMAC_KEY"
LOCAL_KEY_FILE = Path(".rtrec") / "hmac.key"
MIN_KEY_LENGTH = 16


def _read(path: Path, where: str) -> str:
    try:
        key = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"{where} = {str(path)!r} cannot be read: {e.strerror}") from None
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(
            f"{where} = {str(path)!r} holds a key of {len(key)} characters; use at least "
            f"{MIN_KEY_LENGTH} random ones (e.g. `openssl rand -hex 32 > {path}`)"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "%s %s can be read by other users (mode %o): chmod 600 it",
            where,
            path,
            stat.S_IMODE(mode),
        )
    return key


def _from_deployment(cfg: AppConfig) -> str | None:
    if cfg.job.hmac_key_file:
        return _read(Path(cfg.job.hmac_key_file), "job.hmac_key_file")
    env = os.environ.get(KEY_ENV, "").strip()
    if env:
        if len(env) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"{KEY_ENV} holds a key of {len(env)} characters; use at least "
                f"{MIN_KEY_LENGTH} random ones (e.g. `openssl rand -hex 32`)"
            )
        return env
    return None


def require_deployment_key(cfg: AppConfig) -> None:
    """ConfigError unless the key comes from ``job.hmac_key_file`` or ``RTREC_HMAC_KEY``
    (or pseudonymisation is off): a cluster job never runs on a generated local key."""
    if cfg.job.pseudonymise and _from_deployment(cfg) is None:
        raise ConfigError(
            "no pseudonymisation key: set job.hmac_key_file = PATH to a file with the key "
            f"(mode 0600; e.g. `openssl rand -hex 32 > PATH`) or the environment variable "
            f"{KEY_ENV}; keep the key stable, user state is keyed by it "
            "(job.pseudonymise = false stores raw user ids instead)"
        )


def _local_key(path: Path) -> str:
    if path.exists():
        return _read(path, "the local key file")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it just now
        return _read(path, "the local key file")
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    # Once per installation: stderr, not the log, so that it is seen.
    print(
        f"rtrec: generated a pseudonymisation key for this installation in {path} (mode 0600); "
        f"keep it (user state is keyed by it). Deployments set job.hmac_key_file or {KEY_ENV}.",
        file=sys.stderr,
    )
    return key


def pseudonymisation_key(cfg: AppConfig) -> str:
    """The key of this run ("" when ``job.pseudonymise`` is false): see the module doc."""
    if not cfg.job.pseudonymise:
        return ""
    key = _from_deployment(cfg)
    return key if key is not None else _local_key(LOCAL_KEY_FILE)
