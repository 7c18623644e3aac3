import json
import subprocess
import sys


def test_rtrec_eval_writes_table_json_and_plots(tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rtrec.cli",
            "eval",
            "--out",
            str(out),
            "--set",
            "replay.num_events=1500",
            "--set",
            "replay.num_items=80",
            "--set",
            "model.text_encoder='none'",
            "--set",
            "model.dim=16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert {"online", "frozen", "cooccurrence_windowed", "session_knn", "popularity"} <= set(
        res["models"]
    )
    assert (out / "recall_over_time.png").stat().st_size > 1000
    assert "online" in proc.stdout and "|" in proc.stdout  # the markdown table
