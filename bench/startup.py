"""Where the encode command's fixed cost goes: the driver's phases up to the first encoded block, timed.

    python bench/startup.py --model bench/results/work/model-tiny \
        --input 'bench/results/work/corpus-tiny-96/shard-*.tar'

Runs in a fresh interpreter (imports are part of the cost) the steps `run_encode` takes before the
first batch comes out of the encoder, and prints seconds per phase, with load-vs-view of the model
side by side (the full load is what the driver used to do).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    phases: dict[str, float] = {}
    mark = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - mark[0]
        mark[0] = now

    phases["interpreter_to_main"] = mark[0] - T0
    import torch  # noqa: F401

    phase("import_torch")
    import diffusers  # noqa: F401

    phase("import_diffusers")
    import ray.data  # noqa: F401

    phase("import_ray_data")
    from latentcache.config import EncodeConfig
    from latentcache.models import ModelSpec, load_vae, weights_sha256
    from latentcache.pipeline import encoded_dataset, ensure_ray, plan_placement
    from latentcache.sources import plan_shards
    from latentcache.startup import model_view

    phase("import_latentcache")
    cfg = EncodeConfig(
        input=args.input, output="/tmp/unused", model=args.model, resolution=args.resolution, batch_size=args.batch_size
    )
    shards = plan_shards(cfg.input, cfg.input_format, cfg.storage_options)
    phase("plan_shards")
    load_vae(ModelSpec.from_config(cfg))
    phase("driver_load_vae_before")
    model_view(ModelSpec.from_config(cfg))
    phase("driver_model_view_now")
    weights_sha256(cfg.model)
    phase("weights_sha256")
    ensure_ray()
    phase("ray_init")
    ds = encoded_dataset(cfg, shards, plan_placement(cfg))
    phase("build_dataset")
    it = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    next(it)
    phase("first_encoded_block")
    for _ in it:
        pass
    phase("rest_of_the_run")
    phases["load_average"] = os.getloadavg()[0]
    print(json.dumps(phases, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
