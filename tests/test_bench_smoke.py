"""The benchmark harness runs end to end at its smallest size (it asserts nothing about speed)."""

from __future__ import annotations

import json

from bench import run as bench


def test_bench_harness_smoke(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--workload",
                "standin",
                "--images",
                "4",
                "8",
                "--repeats",
                "1",
                "--resolution",
                "32",
                "--image-size",
                "64",
                "80",
                "--batch-size",
                "4",
                "--decode-cpus",
                "1",
                "--workdir",
                str(tmp_path / "w"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    (workload,) = report["workloads"]
    assert set(workload["whole_seconds"]) == {"naive", "e2e"}
    assert all(set(per) == {"4", "8"} for per in workload["whole_seconds"].values())
    assert workload["bound_images_per_s"] > 0 and workload["steady_e2e_over_naive"] != 0
    assert "| standin | 4/8 |" in report["table"]
