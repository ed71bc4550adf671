"""benchmarks/data_speed.py in CI size: every loader delivers, and the table's numbers are consistent."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_speed_reports_every_loader_next_to_the_step_time():
    r = subprocess.run([sys.executable, "benchmarks/data_speed.py", "--presets", "tiny", "--files", "6",
                        "--file-seconds", "2", "--batches", "20", "--step-repeat", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)["rows"]
    assert [row["loader"] for row in rows] == ["inline", "thread", "process"]
    for row in rows:
        assert row["preset"] == "tiny" and row["workers"] == (row["loader"] == "process")
        assert row["batches_per_s"] > 0 and row["host_ms_per_batch"] >= 0
        assert 0 < row["features_ms"] < row["model_step_ms"]


def test_data_speed_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "benchmarks/data_speed.py", "--loaders", "thread,fork", "--check-args"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown" in r.stderr
