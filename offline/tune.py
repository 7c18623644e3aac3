"""`rtrec tune`: hyperparameter search with Optuna, scored like `rtrec eval` scores "online".

Each trial is a configuration (the base config with the trial's values), and its score is
the prequential NDCG@k of a fresh online learner on a validation slice of the dataset
(:func:`offline.training.online_prequential`: learn from the slice's first
``warmup`` share of samples, then test-then-train on the rest, with the job's trainer).

- The validation slice is the first ``fraction`` of the dataset's samples (events in
  event-time order), so the rest stays unseen for an honest `rtrec eval` afterwards.
- The search space maps config keys (``section.key``) to a spec: ``LOW..HIGH`` (uniform;
  integer when the key is an int), ``LOW..HIGH:log`` (log-uniform), ``A,B,C`` (one of) or
  a single value (fixed). :data:`DEFAULT_SPACE` covers learning rate, batch size,
  embedding size, history length, loss and optimizer; ``--space KEY=SPEC`` adds or
  replaces a dimension, and keys fixed with ``--set`` leave the default space.
- Trial 0 runs the base config (its values that lie in the space), so the table says what
  the search gained over it. The TPE sampler is seeded; the trainer is seeded by
  ``trainer.seed``, so the same inputs give the same trials.
- Output: the best config as TOML (every key; `rtrec run --config` loads it) and the
  trials table as JSON next to it (``best.toml`` -> ``best.trials.json``).
"""

from __future__ import annotations

import json
import logging
import time
import tomllib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from flink_job.config import AppConfig, ConfigError, replace_values, to_dict, to_toml
from models.events import Item
from models.history import Sample
from models.text_encoder import TextEncoder, configured_precision, load_configured_encoder
from offline.stream import to_stream
from offline.training import online_prequential, split_stream
from replay.datasets import Record

log = logging.getLogger(__name__)

# What `rtrec tune` searches unless told otherwise (config key -> spec, see parse_param).
DEFAULT_SPACE: dict[str, str] = {
    "trainer.lr": "0.001..0.5:log",
    "trainer.batch_size": "16,32,64,128,256",
    "model.dim": "16,32,64,128",
    "model.history_length": "5,10,20,50",
    "trainer.loss": "sampled_softmax,full_softmax,bpr,adaptive_softmax",
    "trainer.optimizer": "adagrad,sgd,adam",
}


class TuneError(ConfigError):
    """Bad tuning input (search space, dataset, budget); the message says what to change."""


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a numeric range or a list of choices."""

    key: str
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    @property
    def is_range(self) -> bool:
        return not self.choices

    def suggest(self, trial: Any) -> Any:
        if not self.is_range:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if not self.is_range:
            return any(type(c) is type(value) and c == value for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if not self.is_range:
            return ",".join(_fmt(c) for c in self.choices)
        return f"{_fmt(self.low)}..{_fmt(self.high)}{':log' if self.log else ''}"


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _scalar(raw: str) -> Any:
    """A TOML scalar (``0.1``, ``64``, ``true``, ``"x"``) or a bare string (``adam``)."""
    raw = raw.strip()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _field_type(key: str) -> Any:
    """The annotated type of config key ``section.key`` (ConfigError naming valid keys)."""
    section, _, name = key.partition(".")
    hints = typing.get_type_hints(AppConfig)
    if not name or "." in name:
        raise TuneError(f"--space {key}: expected section.key (e.g. trainer.lr)")
    if section not in hints:
        raise TuneError(
            f"--space {key}: unknown section {section!r}; sections: {', '.join(sorted(hints))}"
        )
    cls = hints[section]
    names = sorted(f.name for f in fields(cls))
    if name not in names:
        raise TuneError(
            f"--space {key}: unknown key {name!r} in [{section}]; valid keys: {', '.join(names)}"
        )
    tp = typing.get_type_hints(cls)[name]
    if is_dataclass(tp) or typing.get_origin(tp) in (dict, tuple):
        raise TuneError(
            f"--space {key}: only scalar keys (numbers, strings, booleans) can be tuned"
        )
    return tp


def parse_param(key: str, spec: str, base: AppConfig) -> Param:
    """``spec`` for config ``key`` as a Param, each value checked against the config rules."""
    key = key.strip()
    tp = _field_type(key)
    spec = spec.strip()
    if not spec:
        raise TuneError(f"--space {key}: empty spec; use LOW..HIGH, LOW..HIGH:log or A,B,C")

    def check(value: Any) -> Any:
        try:
            return _get(replace_values(base, {key: value}), key)
        except ConfigError as e:
            raise TuneError(f"--space {key}={spec}: {e}") from e

    if ".." in spec:
        body, _, opt = spec.partition(":")
        if opt not in ("", "log"):
            raise TuneError(f"--space {key}={spec}: unknown option {opt!r} (only ':log')")
        lo_raw, _, hi_raw = body.partition("..")
        if tp not in (int, float):
            raise TuneError(
                f"--space {key}={spec}: a range needs a numeric key; {key} is "
                f"{getattr(tp, '__name__', tp)} - list the values instead (A,B,C)"
            )
        lo, hi = check(_scalar(lo_raw)), check(_scalar(hi_raw))
        if not lo < hi:
            raise TuneError(f"--space {key}={spec}: LOW must be below HIGH")
        if opt == "log" and lo <= 0:
            raise TuneError(f"--space {key}={spec}: a log range needs LOW > 0")
        return Param(key, low=lo, high=hi, log=opt == "log", integer=tp is int)
    choices: list[Any] = []
    for raw in spec.split(","):
        v = check(_scalar(raw))
        if v not in choices:
            choices.append(v)
    return Param(key, choices=tuple(choices))


def build_space(
    base: AppConfig,
    specs: Iterable[str] = (),
    fixed: Iterable[str] = (),
    defaults: dict[str, str] | None = None,
) -> dict[str, Param]:
    """The default space without the ``fixed`` keys, then each ``KEY=SPEC`` of ``specs``."""
    fixed_keys = {k.strip() for k in fixed}
    items = {k: v for k, v in (DEFAULT_SPACE if defaults is None else defaults).items()}
    for k in fixed_keys & set(items):
        log.info("not searching %s: fixed by --set", k)
        del items[k]
    for s in specs:
        if "=" not in s:
            raise TuneError(
                f"--space {s!r} must look like section.key=SPEC (e.g. trainer.lr=0.01..0.3:log)"
            )
        k, v = s.split("=", 1)
        items[k.strip()] = v
    space = {k: parse_param(k, v, base) for k, v in items.items()}
    if not space:
        raise TuneError("the search space is empty: add dimensions with --space KEY=SPEC")
    return space


@dataclass
class TuneResult:
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    baseline_value: float | None  # trial 0 = the base config, when all its values are in the space
    best_config: AppConfig
    trials: list[dict[str, Any]]
    toml_path: Path
    trials_path: Path
    metric: str
    extra: dict[str, Any] = field(default_factory=dict)


def _n_positives(stream: Sequence[Item | Sample]) -> int:
    return sum(1 for x in stream if isinstance(x, Sample) and x.label == 1 and x.weight > 0)


def tune(
    base: AppConfig,
    records: Sequence[Record],
    space: dict[str, Param],
    out: str | Path,
    trials: int = 20,
    timeout: float | None = None,
    seed: int = 0,
    fraction: float = 0.5,
    warmup: float = 0.2,
    k: int = 10,
    progress: bool = True,
    dataset: str | None = None,
    cache_dir: str | Path | None = None,
) -> TuneResult:
    """Search ``space`` for the best prequential NDCG@k; write the best TOML + trials JSON
    (``cache_dir``: where catalogue text vectors are cached across runs, None = nowhere)."""
    import optuna

    if trials < 1:
        raise TuneError(f"--trials must be >= 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise TuneError(f"--timeout must be > 0 seconds, got {timeout}")
    if not 0 < fraction <= 1:
        raise TuneError(f"--fraction must be in (0, 1], got {fraction}")
    if not 0 <= warmup < 1:
        raise TuneError(f"--warmup must be in [0, 1), got {warmup}")
    dataset = dataset or base.replay.dataset
    metric = f"ndcg@{k}"

    # Streams depend on the per-user stage (history length, user settings): one per variant.
    streams: dict[str, list[Item | Sample]] = {}

    def validation_slice(cfg: AppConfig) -> list[Item | Sample]:
        key = json.dumps(
            [cfg.model.history_length, to_dict(cfg)["user"], cfg.job.model_key], sort_keys=True
        )
        if key not in streams:
            streams[key] = split_stream(list(to_stream(records, cfg)), fraction)[0]
        return streams[key]

    encoders: dict[tuple[str, int, str], TextEncoder | None] = {}

    def encoder_for(cfg: AppConfig) -> TextEncoder | None:
        ek = (
            cfg.model.text_encoder,
            cfg.model.text_max_length,
            configured_precision(cfg.model, cfg.trainer.deterministic),
        )
        if ek not in encoders:
            encoders[ek] = load_configured_encoder(
                cfg.model, cfg.trainer.deterministic, memo_size=1_000_000, cache_dir=cache_dir
            )
        return encoders[ek]

    val = validation_slice(base)
    n_samples = sum(isinstance(x, Sample) for x in val)
    scored = _n_positives(split_stream(val, warmup)[1])
    if scored == 0:
        raise TuneError(
            f"nothing to score: dataset {dataset!r} gives {len(records)} records and "
            f"{n_samples} samples in the validation slice (first {fraction:.0%}), and no "
            f"positive sample after its {warmup:.0%} warm-up; use a dataset with events "
            "(check the path / replay.num_events), a larger --fraction or a smaller --warmup"
        )
    log.info(
        "tuning on %s: %d samples in the validation slice (first %.0f%%), %d positives scored "
        "after a %.0f%% warm-up; %d trial(s)%s; space: %s",
        dataset,
        n_samples,
        fraction * 100,
        scored,
        warmup * 100,
        trials,
        f", timeout {timeout:g}s" if timeout else "",
        "; ".join(f"{p.key}={p.describe()}" for p in space.values()),
    )

    if base.model.text_encoder != "none":
        n_items = sum(isinstance(x, Item) for x in val)
        log.info(
            "trial 0 also embeds the text of %d catalogue items with %s (later trials reuse it)",
            n_items,
            base.model.text_encoder,
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    base_values = {key: _get(base, key) for key in space}
    in_space = {key: v for key, v in base_values.items() if space[key].contains(v)}
    outside = sorted(set(base_values) - set(in_space))
    study.enqueue_trial(in_space)
    if outside:
        log.info(
            "trial 0 runs the base config except %s (not in the search space)", ", ".join(outside)
        )
    else:
        log.info("trial 0 runs the base config")

    def objective(trial: Any) -> float:
        params = {key: p.suggest(trial) for key, p in space.items()}
        t0 = time.perf_counter()
        try:
            cfg = replace_values(base, params)
            res = online_prequential(
                cfg,
                validation_slice(cfg),
                encoder_for(cfg),
                warmup=warmup,
                k=k,
                progress=progress,
                desc=f"trial {trial.number}",
            )
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
            raise
        overall = res.span(0, len(res.buckets))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
        trial.set_user_attr(f"recall@{k}", overall[f"recall@{k}"])
        trial.set_user_attr("mrr", overall["mrr"])
        trial.set_user_attr("positives", overall["n"])
        return float(overall[metric])

    def report(study: Any, t: Any) -> None:
        total = f" ({t.number + 1}/{trials})"
        params = " ".join(f"{key.split('.')[1]}={_fmt(v)}" for key, v in t.params.items())
        secs = t.user_attrs.get("seconds", 0.0)
        if t.state.name != "COMPLETE":
            log.warning(
                "trial %d%s %s after %.1fs (%s): %s",
                t.number,
                total,
                t.state.name.lower(),
                secs,
                params,
                t.user_attrs.get("error", "-"),
            )
            return
        best = study.best_trial
        log.info(
            "trial %d%s: %s %.4f (best %.4f, trial %d) in %.1fs | %s",
            t.number,
            total,
            metric.upper(),
            t.value,
            best.value,
            best.number,
            secs,
            params,
        )

    try:
        study.optimize(
            objective, n_trials=trials, timeout=timeout, catch=(Exception,), callbacks=[report]
        )
    except KeyboardInterrupt:
        log.warning("interrupted: writing the results of the finished trials")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        errors = {t.user_attrs.get("error", t.state.name) for t in study.trials}
        raise TuneError(
            f"no trial completed ({len(study.trials)} started): {'; '.join(sorted(errors))}"
        )
    best = max(done, key=lambda t: (t.value, -t.number))
    best_cfg = replace_values(base, dict(best.params))
    first = study.trials[0]
    baseline = float(first.value) if not outside and first.state.name == "COMPLETE" else None
    table = [
        {
            "number": t.number,
            "state": t.state.name,
            metric: t.value,
            f"recall@{k}": t.user_attrs.get(f"recall@{k}"),
            "mrr": t.user_attrs.get("mrr"),
            "seconds": t.user_attrs.get("seconds"),
            "params": dict(t.params),
            **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
        }
        for t in study.trials
    ]
    out = Path(out)
    trials_path = out.with_name(out.stem + ".trials.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "dataset": dataset,
        "metric": metric,
        "fraction": fraction,
        "warmup": warmup,
        "seed": seed,
        "validation_samples": n_samples,
        "scored_positives": scored,
        "space": {key: p.describe() for key, p in space.items()},
        "best": {"number": best.number, metric: best.value, "params": dict(best.params)},
        "baseline": {"number": 0, metric: baseline, "params": in_space},
        "config": str(out),
        "trials": table,
    }
    header = [
        f"# rtrec tune: best of {len(done)} completed trial(s) (trial {best.number}), "
        f"prequential {metric.upper()} = {best.value:.6f}",
        f"# on {dataset} (first {fraction:.0%} of the samples, {warmup:.0%} warm-up), "
        f"sampler seed {seed}; trials: {trials_path.name}",
        "# the base config with these tuned values:",
        *(f"#   {key} = {_fmt(v)}" for key, v in best.params.items()),
        "",
    ]
    out.write_text("\n".join(header) + to_toml(best_cfg))
    trials_path.write_text(json.dumps(summary, indent=2))
    return TuneResult(
        best_number=best.number,
        best_value=float(best.value),
        best_params=dict(best.params),
        baseline_value=baseline,
        best_config=best_cfg,
        trials=table,
        toml_path=out,
        trials_path=trials_path,
        metric=metric,
    )


def _get(cfg: AppConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def fixed_keys(overrides: Iterable[str]) -> list[str]:
    """The config keys that ``--set KEY=VALUE`` overrides name."""
    return [ov.split("=", 1)[0].strip() for ov in overrides if "=" in ov]
