"""Why the encoder is slower inside Ray: the same LatentEncoder batch call, timed in different hosts.

    python bench/actor_overhead.py --model bench/results/work/model-tiny --resolution 256 --rounds 2

Each variant runs in a fresh process (or Ray actor) and times `LatentEncoder.__call__` on the same
in-memory pixel rows, after one warm-up call. Variants are interleaved round by round, so a noisy
neighbour on a shared machine hits them all alike; the table gives each one's median seconds per
batch and its ratio to the plain process's main thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def pixel_table(rows: int, resolution: int, seed: int = 0) -> pa.Table:
    """Pixel rows as preprocess emits them (random uint8: the model's cost does not depend on content)."""
    from latentcache.rows import PIXEL_SCHEMA, carry

    rng = np.random.default_rng(seed)
    pixels = [rng.integers(0, 256, (3, resolution, resolution), dtype=np.uint8).tobytes() for _ in range(rows)]
    raw = pa.table(
        {
            "key": [f"k{i}" for i in range(rows)],
            "shard": ["s"] * rows,
            "index": list(range(rows)),
            "error": pa.nulls(rows, pa.string()),
        }
    )
    return carry(raw, PIXEL_SCHEMA, {"pixels": pixels, "height": [resolution] * rows, "width": [resolution] * rows})


def make_encoder(model: str, features: dict[str, Any]) -> Any:
    from latentcache.encode import EncodeSpec, LatentEncoder
    from latentcache.models import ModelSpec

    return LatentEncoder(model=ModelSpec(model=model), spec=EncodeSpec(**features))


def measure(fn: Any) -> dict[str, float]:
    """Wall seconds, this process's CPU seconds and minor page faults of one call: on a shared, loaded
    machine the wall time swings with the neighbours, CPU time and page faults much less."""
    usage, cpu, start = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "minflt": float(after.ru_minflt - usage.ru_minflt),
    }


def time_calls(encoder: Any, table: pa.Table, calls: int, in_thread: bool) -> list[dict[str, float]]:
    """Cost of each encoder call after one warm-up, on the main thread or a pool thread (as Ray Data does)."""
    pool = ThreadPoolExecutor(max_workers=1) if in_thread else None

    def call() -> dict[str, float]:
        return measure(lambda: pool.submit(encoder, table).result() if pool else encoder(table))

    call()
    return [call() for _ in range(calls)]


def run_process(args: dict[str, Any]) -> list[dict[str, float]]:
    """Entry point of the subprocess variants."""
    import torch

    torch.set_num_threads(args.get("threads") or os.cpu_count() or 1)
    encoder = make_encoder(args["model"], args["features"])
    return time_calls(encoder, pixel_table(args["batch"], args["resolution"]), args["calls"], args["in_thread"])


def subprocess_variant(args: dict[str, Any], env: dict[str, str]) -> list[dict[str, float]]:
    code = f"import json,sys; from bench.actor_overhead import run_process; print(json.dumps(run_process({args!r})))"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    argv = [sys.executable, "-c", code]
    out = subprocess.run(argv, env=full_env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class TimedEncoder:
    """The pipeline's encoder, reporting how long each of its calls took inside the actor."""

    def __init__(self, model: str, features: dict[str, Any]) -> None:
        self.encoder = make_encoder(model, features)

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.table({k: [v] for k, v in measure(lambda: self.encoder(table)).items()})


def ray_data_variant(args: dict[str, Any], env: dict[str, str]) -> list[dict[str, float]]:
    """map_batches over an actor pool exactly as pipeline.encoded_dataset places the encoder."""
    import ray
    import ray.data

    table = pixel_table(args["batch"], args["resolution"])
    ds = ray.data.from_arrow([table] * (args["calls"] + 1))
    from latentcache.encode import EncodeSpec

    features = {**args["features"], "threads": args.get("threads") or os.cpu_count()}
    assert EncodeSpec(**features)
    ds = ds.map_batches(
        TimedEncoder,
        fn_constructor_kwargs={"model": args["model"], "features": features},
        batch_format="pyarrow",
        batch_size=args["batch"],
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1.0,
        runtime_env={"env_vars": env} if env else None,
    )
    return ds.take_all()[1:]  # the first call warms up, as in the process variants


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
NO_DECAY = {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}  # jemalloc's default purges big extents at once
GLIBC_TUNED = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def variants(selected: list[str]) -> dict[str, tuple[str, dict[str, Any], dict[str, str]]]:
    """name -> (host, overrides of the run args, environment)."""
    all_variants = {
        "process_main": ("process", {"in_thread": False}, {}),
        "process_thread": ("process", {"in_thread": True}, {}),
        "process_thread_omp1": ("process", {"in_thread": True}, {"OMP_NUM_THREADS": "1"}),
        "process_thread_jemalloc": ("process", {"in_thread": True}, {"LD_PRELOAD": JEMALLOC}),
        "process_main_jemalloc": ("process", {"in_thread": False}, {"LD_PRELOAD": JEMALLOC}),
        "process_thread_tcmalloc": ("process", {"in_thread": True}, {"LD_PRELOAD": TCMALLOC}),
        "process_thread_glibc_tuned": ("process", {"in_thread": True}, GLIBC_TUNED),
        "process_main_channels_last": ("process", {"in_thread": False, "features": {"channels_last": True}}, {}),
        "ray_data": ("ray", {}, {}),
        "ray_data_glibc_tuned": ("ray", {}, GLIBC_TUNED),
        "ray_data_jemalloc": ("ray", {}, {"LD_PRELOAD": JEMALLOC}),
        "ray_data_tcmalloc": ("ray", {}, {"LD_PRELOAD": TCMALLOC}),
        "ray_data_jemalloc_channels_last": ("ray", {"features": {"channels_last": True}}, {"LD_PRELOAD": JEMALLOC}),
        "process_main_jemalloc_nodecay": ("process", {"in_thread": False}, {"LD_PRELOAD": JEMALLOC, **NO_DECAY}),
        "process_main_tcmalloc": ("process", {"in_thread": False}, {"LD_PRELOAD": TCMALLOC}),
        "process_main_tcmalloc_channels_last": (
            "process",
            {"in_thread": False, "features": {"channels_last": True}},
            {"LD_PRELOAD": TCMALLOC},
        ),
        "ray_data_tcmalloc_channels_last": ("ray", {"features": {"channels_last": True}}, {"LD_PRELOAD": TCMALLOC}),
    }
    return {name: all_variants[name] for name in selected}


METRICS = ("wall", "cpu", "minflt")


def summarise(calls: list[dict[str, float]]) -> str:
    return "  ".join(f"{k} {statistics.median(c[k] for c in calls):9.2f}" for k in METRICS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["process_main", "process_thread", "ray_data"])
    parser.add_argument("--out", default="bench/results/actor_overhead.json")
    args = parser.parse_args(argv)
    base = {
        "model": args.model,
        "resolution": args.resolution,
        "batch": args.batch,
        "calls": args.calls,
        "in_thread": False,
        "features": {},
    }
    chosen, load = variants(args.variants), os.getloadavg()
    if any(host == "ray" for host, _, _ in chosen.values()):
        from latentcache.pipeline import ensure_ray

        ensure_ray()
    calls: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, (host, overrides, env) in chosen.items():
            run = subprocess_variant if host == "process" else ray_data_variant
            calls[name] += run({**base, **overrides}, env)
            print(f"{name:34s} {summarise(calls[name])} (load {os.getloadavg()[0]:.1f})", flush=True)
    first = next(iter(chosen))
    ref = {k: statistics.median(c[k] for c in calls[first]) for k in METRICS}
    report = {
        "load_before_after": [load, os.getloadavg()],
        "batch": args.batch,
        "resolution": args.resolution,
        "variants": {
            n: {
                **{k: statistics.median(x[k] for x in c) for k in METRICS},
                "calls": c,
                **{f"{k}_vs_first": statistics.median(x[k] for x in c) / ref[k] for k in METRICS},
            }
            for n, c in calls.items()
        },
    }
    print(f"\n| variant | wall s/batch | CPU s/batch | minor faults/batch | wall vs {first} | CPU vs {first} |")
    print("|---|---|---|---|---|---|")
    for name, r in report["variants"].items():
        print(
            f"| {name} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['minflt']:.0f} | {r['wall_vs_first']:.2f} "
            f"| {r['cpu_vs_first']:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
