"""bench/data_scaling.py runs both sides on a corpus it writes, locally and from the loopback S3 server.

The measurement itself (1k-100k images) belongs to the benchmark; this keeps its code paths working on a
tiny corpus: the two sides encode the same images, every figure is written to scaling.json. No timing is
asserted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "data_scaling.py"


@pytest.mark.slow
def test_scaling_bench_encodes_the_same_images_on_both_sides_and_writes_its_figures(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "40,80", "--per-shard", "20",
                           "--storage", "local,s3", "--flavor", "debug", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "scaling.json").read_text())
    assert [(r["storage"], r["size"], r["shards"]) for r in rows] == [
        ("local", 40, 2), ("local", 80, 4), ("s3", 40, 2), ("s3", 80, 4)]
    for r in rows:
        assert r["ray_images"] == r["naive_images"] >= 0.9 * r["size"], r  # a few fail the filters
        assert r["ray_stored"] == r["naive_stored"] == r["ray_images"], r  # both stores hold every image
        assert r["ray_ips"] > 0 and r["naive_ips"] > 0 and r["driver_peak_mib"] > 0 and r["workers_peak_mib"] > 0
        assert r["naive_threads"] == r["encoder_threads"] >= 1
    assert "Ray wall =" in proc.stdout
