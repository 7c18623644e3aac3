"""`rtrec tune`: Optuna search scored by the online learner's prequential NDCG@10."""

from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import pytest

from flink_job.config import load_config
from offline.evaluate import run_eval
from offline.stream import to_stream
from offline.training import online_prequential
from offline.tune import DEFAULT_SPACE, TuneError, build_space, parse_param, tune
from replay.datasets import records
from rtrec.cli import main

pytestmark = pytest.mark.unit

TINY = [
    "replay.num_events=400",
    "replay.num_items=40",
    "replay.num_users=30",
    "replay.new_items_midstream=4",
    "model.text_encoder='none'",
]
# Small and cheap, but every kind of dimension: log range, ints, strings.
SPACE = [
    "trainer.lr=0.005..0.3:log",
    "trainer.batch_size=32,64",
    "model.dim=8,16",
    "model.history_length=5,10",
    "trainer.loss=sampled_softmax,bpr",
    "trainer.optimizer=adagrad,adam",
]


def _set(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--set", a)]


def _space(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--space", a)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One `rtrec tune` run (3 trials) through the CLI: (exit code, stdout, out path)."""
    out = tmp_path_factory.mktemp("tune") / "best.toml"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "tune",
                "--trials",
                "3",
                "--seed",
                "3",
                "--out",
                str(out),
                *_set(["model.dim=8", *TINY]),
                *_space(SPACE),
            ]
        )
    return rc, buf.getvalue(), out


def test_best_toml_loads_and_holds_the_best_trials_params(tuned, capsys):
    rc, stdout, out = tuned
    assert rc == 0, stdout
    table = json.loads(out.with_name("best.trials.json").read_text())
    trials = table["trials"]
    assert len(trials) == 3 and all(t["state"] == "COMPLETE" for t in trials)
    best = max(trials, key=lambda t: t["ndcg@10"])
    assert table["best"]["number"] == best["number"]
    assert table["best"]["params"] == best["params"]

    cfg = load_config(out)  # base config (the --set values) + the best params
    for key, value in best["params"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    assert cfg.replay.num_events == 400 and cfg.model.text_encoder == "none"

    # `rtrec config --config best.toml` accepts it and prints the same config back.
    assert main(["config", "--config", str(out)]) == 0
    printed = capsys.readouterr().out
    assert load_config(out) == cfg
    assert printed == re.sub(r"(?m)^#.*\n", "", out.read_text())


def test_reported_score_is_the_best_trials(tuned):
    _, stdout, out = tuned
    trials = json.loads(out.with_name("best.trials.json").read_text())["trials"]
    best = max(trials, key=lambda t: t["ndcg@10"])
    m = re.search(r"best NDCG@10 (\d\.\d+) \(trial (\d+) of 3\)", stdout)
    assert m, stdout
    assert float(m.group(1)) == pytest.approx(best["ndcg@10"], abs=5e-5)
    assert int(m.group(2)) == best["number"]
    assert f"{best['ndcg@10']:.6f}" in out.read_text().splitlines()[0]


def test_trial_zero_is_the_base_config_and_set_keys_are_not_searched(tuned):
    out = tuned[2]
    table = json.loads(out.with_name("best.trials.json").read_text())
    base = load_config(None, ["model.dim=8", *TINY])
    first = table["trials"][0]["params"]
    assert first["trainer.lr"] == base.trainer.lr
    assert first["trainer.optimizer"] == base.trainer.optimizer
    # --space model.dim=8,16 names it explicitly, so it is searched despite --set model.dim.
    assert "model.dim" in table["space"]
    # The base batch size (64) and history length (20) are outside SPACE: no baseline score.
    assert table["baseline"]["ndcg@10"] is None


def test_set_fixes_a_default_dimension_and_space_replaces_one():
    cfg = load_config(None, TINY)
    space = build_space(cfg, ["trainer.lr=0.01..0.1", "trainer.l2=0.0,0.001"], fixed=["model.dim"])
    assert "model.dim" not in space
    assert set(space) == (set(DEFAULT_SPACE) - {"model.dim"}) | {"trainer.l2"}
    lr = space["trainer.lr"]
    assert (lr.low, lr.high, lr.log, lr.integer) == (0.01, 0.1, False, False)
    assert space["trainer.l2"].choices == (0.0, 0.001)
    hist = parse_param("model.history_length", "5..50:log", cfg)
    assert hist.integer and hist.log and (hist.low, hist.high) == (5, 50)


def test_same_seed_same_trials():
    cfg = load_config(None, TINY)
    space = build_space(cfg, SPACE)
    recs = list(records(cfg.replay))

    def run(path):
        res = tune(cfg, recs, space, path, trials=2, seed=11, progress=False)
        return [(t["params"], t["ndcg@10"]) for t in res.trials]

    with tempfile.TemporaryDirectory() as d:
        assert run(Path(d) / "a.toml") == run(Path(d) / "b.toml")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("trainer.lrr=0.01..0.1", r"unknown key 'lrr' in \[trainer\]; valid keys: .*\blr\b"),
        ("modle.dim=8,16", r"unknown section 'modle'"),
        ("trainer.optimizer=adam,rmsprop", r"trainer\.optimizer must be one of adagrad"),
        ("trainer.loss=0.1..0.2", r"a range needs a numeric key"),
        ("trainer.lr=0..0.1:log", r"log range needs LOW > 0"),
        ("trainer.lr=0.5..0.1", r"LOW must be below HIGH"),
        ("model.dim=8.5..16", r"model\.dim: expected int"),
        ("model.dim=0,16", r"model\.dim must be > 0"),
        ("trainer.lr", r"must look like section\.key=SPEC"),
        ("user.weights=1,2", r"only scalar keys"),
    ],
)
def test_bad_space_is_a_clear_error(spec, message):
    with pytest.raises(TuneError, match=message):
        build_space(load_config(None, TINY), [spec])


def test_bad_space_on_the_cli_exits_2_naming_the_key(tmp_path, capsys):
    rc = main(["tune", "--out", str(tmp_path / "b.toml"), "--space", "trainer.lrr=0.1..0.2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "rtrec tune: error: --space trainer.lrr" in err and "valid keys" in err


def test_empty_dataset_is_a_clear_error(tmp_path):
    cfg = load_config(None, [*TINY, "replay.num_events=0"])
    space = build_space(cfg, SPACE)
    with pytest.raises(TuneError, match=r"nothing to score: dataset 'synthetic' .* 0 samples"):
        tune(cfg, list(records(cfg.replay)), space, tmp_path / "b.toml", trials=1)
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    (ml / "movies.csv").write_text("movieId,title,genres\n")
    rc = main(["tune", "--dataset", str(ml), "--out", str(tmp_path / "c.toml"), *_set(TINY)])
    assert rc == 2
    assert not (tmp_path / "c.toml").exists()


def test_objective_is_rtrec_evals_online_score():
    """The shared prequential path scores the online learner exactly as `rtrec eval` does."""
    cfg = load_config(None, TINY)
    stream = list(to_stream(records(cfg.replay), cfg))
    res = online_prequential(cfg, stream, None, warmup=0.2, progress=False)
    ev = run_eval(cfg, stream, warmup=0.2, progress=False)
    online = ev["models"]["online"]["overall"]
    assert res.span(0, 10)["ndcg@10"] == pytest.approx(online["ndcg@10"], rel=1e-9)
    assert res.span(0, 10)["n"] == ev["test_positives"] > 0
