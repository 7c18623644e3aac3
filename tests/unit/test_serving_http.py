"""`rtrec serve` over real HTTP on loopback (uvicorn): requests, bad input, health,
metrics, hot swaps, rollbacks and versions that fail to load."""

import http.client
import json
import shutil

import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.export import build_version
from models.registry import publish, read_latest
from models.serving import HotSwapRecommender
from models.trainer import OnlineLearner, new_meta
from serving.server import MAX_BODY, running
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=16, history_length=8, hidden=32, transition_slots=0)


@pytest.fixture(scope="module")
def versions():
    """Two versions of one model key, after 1,600 and 3,200 samples."""
    learner = OnlineLearner(MC, TrainerConfig(batch_size=64), torch.device("cpu"))
    meta, out = new_meta("m"), []
    data = topic_samples(3200)
    for i in range(0, len(data), 64):
        learner.learn(data[i : i + 64], meta)
        if (i // 64 + 1) % 25 == 0:
            v = build_version(learner, meta, 20, {})
            meta["version"] = v.version
            out.append(v)
    return out


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, json.loads(raw) if ctype.startswith("application/json") else raw


def test_recommend_get_and_post_agree_and_exclude(versions, tmp_path):
    publish(tmp_path, versions[0])
    rec = HotSwapRecommender(tmp_path, "m", threads=1)
    rec.refresh()
    hist = ["t1_1", "t1_2", "t1_3"]
    with running(rec) as (_, port):
        code, got = call(port, "GET", f"/recommend?history={','.join(hist)}&k=5")
        assert code == 200 and got["version"] == versions[0].name and len(got["items"]) == 5
        body = json.dumps({"history": hist, "k": 5}).encode()
        code, posted = call(port, "POST", "/recommend", body)
        assert code == 200 and posted["items"] == got["items"]
        assert not {i for i, _ in got["items"]} & set(hist)
        shown = [i for i, _ in got["items"][:2]]
        body = json.dumps({"history": hist, "exclude": shown, "k": 3}).encode()
        code, fewer = call(port, "POST", "/recommend", body)
        assert [i for i, _ in fewer["items"]] == [i for i, _ in got["items"][2:5]]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("GET", "/recommend?history=t1_1&k=0", None, 400, "k must be an integer in 1..1000"),
        ("GET", "/recommend?history=t1_1&k=abc", None, 400, "k must be an integer"),
        ("POST", "/recommend", b'{"history": ["t1_1"], "k": 5000}', 400, "got 5000"),
        ("POST", "/recommend", b"{not json", 400, "not valid JSON"),
        ("POST", "/recommend", b'["t1_1"]', 400, "must be a JSON object"),
        ("POST", "/recommend", b'{"history": "t1_1"}', 400, "must be a list"),
        ("POST", "/recommend", b'{"histroy": ["t1_1"]}', 400, "unknown field(s) histroy"),
        ("POST", "/recommend", b'{"history": ["nope", "t1_1"]}', 422, "unknown to version"),
        ("POST", "/recommend", b'{"history": [], "skip_unknown": 1}', 400, "true or false"),
        ("POST", "/recommend", b"x" * (MAX_BODY + 1), 413, "over 65536 bytes"),
        ("GET", "/nowhere", None, 404, "unknown path /nowhere"),
        ("DELETE", "/recommend", None, 405, "use GET or POST"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(
    versions, tmp_path, method, path, body, status, says
):
    publish(tmp_path, versions[0])
    rec = HotSwapRecommender(tmp_path, "m", threads=1)
    rec.refresh()
    with running(rec) as (_, port):
        code, got = call(port, method, path, body)
        assert code == status and says in got["error"]
        # The server goes on answering.
        assert call(port, "GET", "/recommend?history=t1_1&k=2")[0] == 200


def test_unknown_items_are_skipped_on_request(versions, tmp_path):
    publish(tmp_path, versions[0])
    rec = HotSwapRecommender(tmp_path, "m", threads=1)
    rec.refresh()
    with running(rec) as (_, port):
        code, got = call(port, "GET", "/recommend?history=nope,t1_1&k=3&skip_unknown=1")
        assert code == 200 and got["unknown"] == ["nope"] and len(got["items"]) == 3


def test_health_readiness_metrics_swaps_and_rollback(versions, tmp_path):
    rec = HotSwapRecommender(tmp_path, "m", threads=1)
    with running(rec) as (_, port):
        assert call(port, "GET", "/v2/health/live") == (200, {"live": True})
        assert call(port, "GET", "/v2/health/ready")[0] == 503
        code, err = call(port, "GET", "/recommend?history=t1_1")
        assert code == 503 and "no model version published yet" in err["error"]
        v1, v2 = versions[0], versions[1]
        publish(tmp_path, v1)
        publish(tmp_path, v2)
        assert rec.refresh() and rec.version_name == v2.name
        code, ready = call(port, "GET", "/v2/health/ready")
        assert code == 200 and ready == {"ready": True, "version": v2.name}
        code, meta = call(port, "GET", "/v2/models/m")
        assert code == 200 and meta["versions"] == [v2.name] and meta["items"] > 0
        # A rollback: LATEST moves back; the previous version is still loaded.
        (tmp_path / "m" / "LATEST").write_text(v1.name + "\n")
        assert rec.refresh() and rec.version_name == v1.name and rec.rollbacks == 1
        code, text = call(port, "GET", "/metrics")
        assert code == 200
        assert 'rtrec_serving_version{model_key="m"} 1' in text
        assert 'rtrec_swaps_total{model_key="m"} 2' in text
        assert 'rtrec_rollbacks_total{model_key="m"} 1' in text
        assert 'rtrec_requests_total{route="/recommend",status="503"} 1' in text
        assert 'rtrec_request_seconds_bucket{le="+Inf"}' in text
        assert "rtrec_model_age_seconds" in text


def test_a_version_that_fails_to_load_never_replaces_the_serving_one(versions, tmp_path):
    v1, v2 = versions
    publish(tmp_path, v1)
    rec = HotSwapRecommender(tmp_path, "m", threads=1)
    assert rec.refresh()
    broken = tmp_path / "m" / v2.name
    shutil.copytree(tmp_path / "m" / v1.name, broken)
    (broken / "model.onnx").write_bytes(b"truncated")
    (tmp_path / "m" / "LATEST").write_text(v2.name + "\n")
    assert read_latest(tmp_path, "m") == v2.name
    assert not rec.refresh() and rec.version_name == v1.name and rec.load_failures == 1
    assert not rec.refresh() and rec.load_failures == 1  # not retried until LATEST moves
    assert rec.recommend([["t1_1"]], 3)[0]
