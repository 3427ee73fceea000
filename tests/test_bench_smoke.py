"""The benchmark harness runs end to end at its smallest size (it asserts nothing about speed)."""

from __future__ import annotations

import json

from bench import run as bench


def test_bench_harness_smoke(ray_session, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--workload", "tiny", "--images", "8", "--repeats", "1", "--resolution", "64",
                       "--batch-size", "4", "--decode-cpus", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (workload,) = report["workloads"]
    assert set(workload["results"]) == {"naive", "model_only", "decode_only", "e2e"}
    assert all(r["images"] == 8 for k, r in workload["results"].items() if k != "model_only")
    assert workload["bound_images_per_s"] > 0 and workload["e2e_over_naive"] > 0
