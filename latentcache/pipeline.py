"""The one place that wires Ray: read -> preprocess -> encode -> write parts -> commit per shard.

Every stage is a plain function or class from its own module; this module only decides where
each runs (CPU tasks for reading and decoding, an actor pool for the encoder, small CPU tasks
that write the final part files) and drives the commit protocol of `latentcache.cache` on the driver.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from tqdm import tqdm

from . import storage
from .buckets import BucketPlanner, bucket_identity, preprocess_bucketed
from .cache.claim import claim_output
from .cache.commit import Committer, ShardLedger, crash_point, fail_shard, remove_unnamed
from .cache.duplicates import settle_duplicates
from .cache.finalize import write_run_outputs
from .cache.layout import Layout
from .cache.log import CommitLog
from .cache.records import COMMITTED
from .cache.writer import WriteSpec, write_block
from .config import EncodeConfig, public_dict
from .console import plan_lines, quiet_ray_data
from .encode import EncodeSpec, LatentEncoder
from .manifest import library_versions
from .models import ModelSpec, check_options, compute_dtype, latent_space_for, weights_sha256
from .preprocess import PreprocessSpec, preprocess_batch
from .sources import ShardRef, SourceOptions, plan_shards, preflight, read_shard_blocks, shard_base
from .startup import encoder_runtime_env, init_local_ray, model_view

log = logging.getLogger(__name__)


class ShardDatasource(Datasource):
    """One read task per input shard; each streams bounded blocks and ends with the shard's marker."""

    def __init__(self, shards: list[ShardRef], options: SourceOptions, rows_per_block: int) -> None:
        self.shards, self.options, self.rows_per_block = shards, options, rows_per_block

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(read_shard_blocks, s, self.options, rows_per_block=self.rows_per_block),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(s.url,)),
            )
            for s in self.shards
        ]


@dataclass(frozen=True)
class Placement:
    num_encoders: int
    encoder_gpus: float
    encoder_cpus: float
    encoder_threads: int | None
    writers: int


# Part writers claim no CPU, so they never hold a decode task back, and are capped instead: per encoder
# one on CPU (the cores are the decoders'), several on GPU (each waits out its object store PUTs).
WRITERS_PER_GPU_ENCODER = 4


def plan_placement(cfg: EncodeConfig) -> Placement:
    """Encoders go where GPUs are (one per GPU, with a core to feed it). On CPU one actor that reserves
    no core: its torch threads and the decode tasks share every core, so with a light encoder decoding
    is not held to the cores left over (bench/run.py's stand-in: one decode task beside it on 2 cores)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        n = cfg.num_encoders or gpus
        return Placement(n, 1.0, default(cfg.encoder_cpus, 1.0), cfg.encoder_threads, n * WRITERS_PER_GPU_ENCODER)
    threads = cfg.encoder_threads or os.cpu_count() or 1
    n = cfg.num_encoders or 1
    return Placement(n, 0.0, default(cfg.encoder_cpus, 0.0), threads, n)


def default(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


def identity(cfg: EncodeConfig, sha: dict[str, str], family: str, space: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "model_sha256": sha,
        "model_class": family,
        "latent_space": space,
        "preprocess": {
            "resolution": cfg.resolution,
            "resize": "bicubic-antialias",
            "max_pixels": cfg.max_pixels,
            "min_size": cfg.min_size,
            **bucket_identity(cfg),
            **({"jpeg_draft": True} if cfg.jpeg_draft else {}),
        },
        "posterior": cfg.posterior,
        "seed": cfg.seed if cfg.posterior == "sample" else None,
        "store_dtype": cfg.store_dtype,
        "format": cfg.format,
        "tensor_layout": cfg.tensor_layout,
        "vq_output": cfg.vq_output,
        "store_posterior": cfg.store_posterior,
        "dtype": cfg.dtype,
    }


def read_dataset(cfg: EncodeConfig, shards: list[ShardRef]) -> ray.data.Dataset:
    """Raw rows (and each shard's marker), one read task per shard."""
    options = SourceOptions.from_config(cfg)
    return ray.data.read_datasource(
        ShardDatasource(shards, options, cfg.rows_per_block), override_num_blocks=len(shards)
    )


def encoded_dataset(
    cfg: EncodeConfig,
    shards: list[ShardRef],
    placement: Placement,
    *,
    select: Callable[[pa.Table], pa.Table] | None = None,
) -> ray.data.Dataset:
    """read -> [select] -> preprocess -> encode, nothing written: shared by encode and the stats job.

    `select` filters raw rows before any image is decoded (the stats job's sample)."""
    pspec = PreprocessSpec(
        resolution=cfg.resolution, max_pixels=cfg.max_pixels, min_size=cfg.min_size, jpeg_draft=cfg.jpeg_draft
    )
    espec = EncodeSpec.from_config(cfg)
    espec = EncodeSpec(**{**espec.__dict__, "threads": placement.encoder_threads})
    ds = read_dataset(cfg, shards)
    if select is not None:  # same CPUs as preprocess, so Ray fuses read, select and decode into one task
        ds = ds.map_batches(select, batch_format="pyarrow", batch_size=None, num_cpus=cfg.decode_cpus)
    decode = preprocess_bucketed if cfg.buckets else preprocess_batch  # bucketed: rows sorted by shape
    ds = ds.map_batches(
        decode,
        fn_kwargs={"spec": pspec, "planner": BucketPlanner.from_config(cfg)},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=cfg.decode_cpus,
    )
    ds = ds.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"model": ModelSpec.from_config(cfg), "spec": espec},
        batch_format="pyarrow",
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=placement.num_encoders),
        num_gpus=placement.encoder_gpus,
        num_cpus=placement.encoder_cpus,
        runtime_env=encoder_runtime_env(),
    )  # startup.py says why; Ray Data restarts dead actors
    return ds


def build_dataset(cfg: EncodeConfig, shards: list[ShardRef], spec: WriteSpec, placement: Placement) -> ray.data.Dataset:
    """Encoded rows re-batched (bounding the parts per shard) into the writer tasks."""
    return encoded_dataset(cfg, shards, placement).map_batches(
        write_block,
        fn_kwargs={"spec": spec},
        batch_format="pyarrow",
        batch_size=max(cfg.rows_per_block, cfg.batch_size),
        num_cpus=0,  # no CPU claimed: Ray Data's budget would hold it back from the decode tasks
        compute=ray.data.TaskPoolStrategy(size=placement.writers),
    )


def iter_mapped(
    ds: ray.data.Dataset, fn: Callable[[pa.Table], pa.Table], *, concurrency: int | None = None
) -> Iterator[dict[str, Any]]:
    """Runs a Ray-free per-block function after `ds` and streams its (small) rows to the driver.

    With `concurrency` (after an encoder) its tasks claim no CPU, as the part writers do."""
    cpus = 0.25 if concurrency is None else 0
    pool = ray.data.TaskPoolStrategy(size=concurrency)
    mapped = ds.map_batches(fn, batch_format="pyarrow", batch_size=None, num_cpus=cpus, compute=pool)
    for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()


def run_encode(cfg: EncodeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Encodes every shard not yet committed under cfg.output; returns the run summary."""
    started = time.time()
    shards = plan_shards(cfg.input, cfg.input_format, cfg.storage_options)
    preflight(shards, SourceOptions.from_config(cfg))
    vae, family = model_view(ModelSpec.from_config(cfg))  # the config only: the encoders load the weights
    check_options(family, cfg, vae)
    space = latent_space_for(vae, cfg).to_dict()
    dtype = str(compute_dtype(vae.config, cfg.dtype, cfg.no_upcast)).removeprefix("torch.")
    del vae
    layout = Layout(cfg.output, cfg.storage_options)
    run_identity = {
        **identity(cfg, weights_sha256(cfg.model, cfg.model_subfolder, cfg.storage_options), family.name, space),
        "compute_dtype": dtype,
    }
    claim_output(layout, run_identity, overwrite=cfg.overwrite)
    commit_log = CommitLog(url=layout.log_url, storage_options=cfg.storage_options)
    records = commit_log.state()
    after_kill = commit_log.unclean()
    if after_kill:
        remove_unnamed(layout, records)
    storage.remove_partial_files(cfg.output, cfg.storage_options)
    todo = [s for s in shards if records.get(s.id, {}).get("status") != COMMITTED]
    if todo or after_kill:
        commit_log.begin_run({"started": started, "shards": len(todo)})
    if todo:
        ensure_ray()
        placement = plan_placement(cfg)
        print(plan_lines(cfg, len(shards), len(todo), placement), flush=True)
        spec = WriteSpec(
            root=cfg.output,
            storage_options=cfg.storage_options,
            format=cfg.format,
            tensor_layout=cfg.tensor_layout,
            store_dtype=cfg.store_dtype,
            space=space,
            bucketed=bool(cfg.buckets),
            base=shard_base([s.url for s in shards]),
        )
        drive(build_dataset(cfg, todo, spec, placement), todo, Committer(layout, commit_log), cfg.format, progress)
    settle_duplicates(layout, commit_log, fmt=cfg.format, space=space, after_kill=after_kill)
    if todo or after_kill:
        commit_log.end_run({"finished": time.time()})
        crash_point("run-ended")
    run = {**run_identity, "config": public_dict(cfg), "versions": library_versions()}
    out = write_run_outputs(layout, commit_log, run, [s.id for s in shards])
    return {
        "output": cfg.output,
        "manifest": layout.url(layout.manifest),
        "stats": layout.url(layout.stats),
        "errors": layout.url(layout.errors_dir),
        "shards": len(shards),
        **out,
        "seconds": round(time.time() - started, 2),
        "skipped_shards": len(shards) - len(todo),
        "encoded_input": encoded_input(commit_log.state(), todo),
    }


def encoded_input(records: dict[str, dict[str, Any]], todo: list[ShardRef]) -> int:
    """Inputs of the shards this run worked on (a resume's throughput leaves out what it skipped)."""
    return sum(records.get(s.id, {}).get("input", 0) for s in todo)


def drive(ds: ray.data.Dataset, todo: list[ShardRef], committer: Committer, fmt: str, progress: bool) -> None:
    """Consumes the writers' metadata rows; commits each shard once all its rows are in."""
    names = {s.id: s.name for s in todo}
    ledger, done = ShardLedger(), set()
    bar = tqdm(total=len(todo), unit="shard", desc="shards", disable=not progress)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for meta in batch.to_pylist():
            shard = ledger.add(meta)
            crash_point("part-written")
            if shard is not None:
                committer.add(finished(committer.layout, ledger.record(shard, names[shard]), fmt))
                done.add(shard)
                bar.update()
    for shard in sorted(set(names) - done):  # rows lost in the pipeline: the shard is failed, its parts go
        record = ledger.record(shard, names[shard])
        committer.add(
            fail_shard(committer.layout, record, fmt, "shard never completed (rows missing from the pipeline)")
        )
    committer.flush()
    bar.close()


def finished(layout: Layout, record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A complete shard's record; an unreadable one (marker status failed) is failed with error rows."""
    if record["status"] == COMMITTED:
        return {k: v for k, v in record.items() if k != "error_index"}  # only a failed shard needs it
    return fail_shard(layout, record, fmt, record.get("shard_error") or "shard failed")


def cluster_started_here() -> bool:
    """Whether `ray start` left a cluster address on this machine (ray.init() would join it)."""
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None) is not None


def ensure_ray() -> None:
    """Joins the cluster this runs in (ray job submit, RAY_ADDRESS) or starts a local one."""
    if not ray.is_initialized():
        verbose = logging.getLogger().isEnabledFor(logging.INFO)  # the CLI's --verbose: Ray's logs too
        quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
        if os.environ.get("RAY_ADDRESS") or cluster_started_here():
            ray.init(**quiet)  # what ray.init() joins by itself: RAY_ADDRESS, or the cluster `ray start` made
        else:
            init_local_ray(include_dashboard=False, **quiet)  # a local one, without the dashboard; allocator.py
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    quiet_ray_data()
