"""The one place that wires Ray: read -> preprocess -> encode -> write fragments -> commit per shard.

Every stage is a plain function or class from its own module; this module only decides where
each runs (CPU tasks for reading and decoding, an actor pool for the encoder, small CPU tasks
for fragments and commits) and keeps the per-shard ledger on the driver.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from tqdm import tqdm

from . import dedupe, finalize, storage
from .buckets import BucketPlanner, bucket_identity, preprocess_bucketed
from .config import EncodeConfig
from .encode import EncodeSpec, LatentEncoder
from .manifest import CacheLayout, claim_output
from .models import ModelSpec, check_options, compute_dtype, hub_env, latent_space_for, load_vae, weights_sha256
from .preprocess import PreprocessSpec, preprocess_batch
from .sinks import CommitSpec, commit_shard, write_fragments
from .sources import ShardRef, SourceOptions, plan_shards, preflight, read_shard_blocks

log = logging.getLogger(__name__)

# glibc returns big freed buffers to the OS after every batch on Ray's worker threads, which
# doubles page faults in the encoder. These keep buffers up to glibc's 32 MB mmap cap in the heap;
# on the tiny workload they changed nothing measurable (bench note), and larger activation buffers
# are always mmapped by glibc, so a different allocator (jemalloc/tcmalloc) is the next step.
ENCODER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
               "MALLOC_TOP_PAD_": str(256 << 20)}


class ShardDatasource(Datasource):
    """One read task per input shard; each streams bounded blocks and ends with the shard's marker."""

    def __init__(self, shards: list[ShardRef], options: SourceOptions, rows_per_block: int) -> None:
        self.shards, self.options, self.rows_per_block = shards, options, rows_per_block

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(read_shard_blocks, s, self.options, rows_per_block=self.rows_per_block),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(s.url,)))
                for s in self.shards]


@dataclass
class ShardLedger:
    """Counts each shard's rows as fragments arrive; says when a shard is complete."""

    fragments: dict[str, list[str]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    status: dict[str, tuple[str, str | None]] = field(default_factory=dict)

    def add(self, meta: dict[str, Any]) -> str | None:
        shard = meta["shard"]
        self.fragments.setdefault(shard, []).append(meta["fragment"])
        self.seen[shard] = self.seen.get(shard, 0) + meta["rows"]
        if meta["shard_rows"] is not None:
            self.expected[shard] = meta["shard_rows"]
            self.status[shard] = (meta["shard_status"], meta["shard_error"])
        return shard if self.seen[shard] == self.expected.get(shard, -1) else None


@dataclass(frozen=True)
class Placement:
    num_encoders: int
    encoder_gpus: float
    encoder_cpus: float
    encoder_threads: int | None


def plan_placement(cfg: EncodeConfig) -> Placement:
    """Encoders go where GPUs are (one per GPU); on CPU one actor, leaving a core for reads."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return Placement(cfg.num_encoders or gpus, 1.0, 1.0, cfg.encoder_threads)
    threads = cfg.encoder_threads or os.cpu_count() or 1
    return Placement(cfg.num_encoders or 1, 0.0, 1.0, threads)


def identity(cfg: EncodeConfig, sha: dict[str, str], family: str, space: dict[str, Any]) -> dict[str, Any]:
    return {"model": cfg.model, "model_sha256": sha, "model_class": family, "latent_space": space,
            "preprocess": {"resolution": cfg.resolution, "resize": "bicubic-antialias",
                           "max_pixels": cfg.max_pixels, "min_size": cfg.min_size, **bucket_identity(cfg)},
            "posterior": cfg.posterior, "seed": cfg.seed if cfg.posterior == "sample" else None,
            "store_dtype": cfg.store_dtype, "format": cfg.format, "tensor_layout": cfg.tensor_layout,
            "vq_output": cfg.vq_output, "store_posterior": cfg.store_posterior, "dtype": cfg.dtype}


def read_dataset(cfg: EncodeConfig, shards: list[ShardRef]) -> ray.data.Dataset:
    """Raw rows (and each shard's marker), one read task per shard."""
    options = SourceOptions.from_config(cfg)
    return ray.data.read_datasource(ShardDatasource(shards, options, cfg.rows_per_block), override_num_blocks=len(shards))


def encoded_dataset(cfg: EncodeConfig, shards: list[ShardRef], placement: Placement, *,
                    select: Callable[[pa.Table], pa.Table] | None = None) -> ray.data.Dataset:
    """read -> [select] -> preprocess -> encode, nothing written: shared by encode and the stats job.

    `select` filters raw rows before any image is decoded (the stats job's sample)."""
    pspec = PreprocessSpec(resolution=cfg.resolution, max_pixels=cfg.max_pixels, min_size=cfg.min_size)
    espec = EncodeSpec.from_config(cfg)
    espec = EncodeSpec(**{**espec.__dict__, "threads": placement.encoder_threads})
    ds = read_dataset(cfg, shards)
    if select is not None:  # same CPUs as preprocess, so Ray fuses read, select and decode into one task
        ds = ds.map_batches(select, batch_format="pyarrow", batch_size=None, num_cpus=cfg.decode_cpus)
    decode = preprocess_bucketed if cfg.buckets else preprocess_batch  # bucketed: rows sorted by shape
    ds = ds.map_batches(decode, fn_kwargs={"spec": pspec, "planner": BucketPlanner.from_config(cfg)},
                        batch_format="pyarrow", batch_size=None,
                        num_cpus=cfg.decode_cpus)
    ds = ds.map_batches(LatentEncoder, fn_constructor_kwargs={"model": ModelSpec.from_config(cfg), "spec": espec},
                        batch_format="pyarrow", batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=placement.num_encoders),
                        num_gpus=placement.encoder_gpus, num_cpus=placement.encoder_cpus,
                        runtime_env={"env_vars": {**ENCODER_ENV, **hub_env()}})  # Ray Data restarts dead actors by default
    return ds


def build_dataset(cfg: EncodeConfig, shards: list[ShardRef], layout: CacheLayout, placement: Placement) -> ray.data.Dataset:
    return encoded_dataset(cfg, shards, placement).map_batches(
        write_fragments, fn_kwargs={"staging": layout.staging, "storage_options": cfg.storage_options},
        batch_format="pyarrow", batch_size=None, num_cpus=0.25)


def iter_mapped(ds: ray.data.Dataset, fn: Callable[[pa.Table], pa.Table]) -> Iterator[dict[str, Any]]:
    """Runs a Ray-free per-block function after `ds` and streams its (small) rows to the driver."""
    mapped = ds.map_batches(fn, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()


def run_encode(cfg: EncodeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Encodes every shard not yet committed under cfg.output; returns the run summary."""
    started = time.time()
    shards = plan_shards(cfg.input, cfg.input_format, cfg.storage_options)
    preflight(shards, SourceOptions.from_config(cfg))
    vae, family = load_vae(ModelSpec.from_config(cfg))
    check_options(family, cfg, vae)
    space = latent_space_for(vae, cfg).to_dict()
    dtype = str(compute_dtype(vae.config, cfg.dtype, cfg.no_upcast)).removeprefix("torch.")
    del vae
    layout = CacheLayout(cfg.output, cfg.storage_options)
    run_identity = {**identity(cfg, weights_sha256(cfg.model, cfg.model_subfolder, cfg.storage_options), family.name, space),
                    "compute_dtype": dtype}
    claim_output(layout, run_identity, overwrite=cfg.overwrite)
    layout.clear_staging()
    records = layout.committed_records()
    todo = [s for s in shards if s.id not in records]
    failed: dict[str, str] = {}
    if todo:
        ensure_ray()
        spec = CommitSpec(output=cfg.output, format=cfg.format, tensor_layout=cfg.tensor_layout, space=space,
                          storage_options=cfg.storage_options, bucketed=bool(cfg.buckets))
        records.update(drive(build_dataset(cfg, todo, layout, plan_placement(cfg)), todo, spec, layout, failed, progress))
    layout.clear_staging()
    records = dedupe.drop_cross_shard_duplicates(layout, records, shards, fmt=cfg.format, space=space,
                                                 store_dtype=cfg.store_dtype)
    return finalize.write_run_outputs(layout, cfg, run_identity, shards, records, failed, time.time() - started)


def drive(ds: ray.data.Dataset, todo: list[ShardRef], spec: CommitSpec, layout: CacheLayout,
          failed: dict[str, str], progress: bool) -> dict[str, dict[str, Any]]:
    """Consumes fragment metadata, commits each shard once all its rows are in, records it."""
    names = {s.id: s.name for s in todo}
    ledger, pending, records = ShardLedger(), {}, {}
    commit = ray.remote(num_cpus=0.25, max_retries=3)(commit_shard)
    bar = tqdm(total=len(todo), unit="shard", desc="shards", disable=not progress)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for meta in batch.to_pylist():
            shard = ledger.add(meta)
            if shard is None:
                continue
            status, error = ledger.status[shard]
            if status == "failed":
                failed[shard] = error
                storage.remove(ledger.fragments[shard], layout.storage_options)
                bar.update()
                continue
            pending[commit.remote(shard=shard, name=names[shard], fragments=ledger.fragments[shard], spec=spec)] = shard
        records.update(collect(pending, ledger, layout, bar, wait=False))
    records.update(collect(pending, ledger, layout, bar, wait=True))
    bar.close()
    for shard in set(names) - set(records) - set(failed):
        status, error = ledger.status.get(shard, (None, None))
        failed[shard] = error if status == "failed" else "shard never completed (rows missing from the pipeline)"
    return records


def collect(pending: dict, ledger: ShardLedger, layout: CacheLayout, bar: tqdm, *, wait: bool) -> dict[str, dict[str, Any]]:
    """Writes the record of each finished commit (the resume point), so a crash never loses it."""
    done: dict[str, dict[str, Any]] = {}
    refs = list(pending)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if wait else 0) if refs else ([], [])
    for ref in ready:
        shard = pending.pop(ref)
        try:
            record = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # storage still failing after its retries: report the shard, go on
            ledger.status[shard] = ("failed", f"commit failed: {storage.describe(exc.cause or exc)}")
            bar.update()
            continue
        record.update(input=ledger.expected[shard], shard_status=ledger.status[shard][0], shard_error=ledger.status[shard][1])
        layout.write_json(record, "_state", "shards", record["name"] + ".json")
        done[shard] = record
        bar.update()
    return done


def cluster_started_here() -> bool:
    """Whether `ray start` left a cluster address on this machine (ray.init() would join it)."""
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None) is not None


def ensure_ray() -> None:
    """Joins the cluster this runs in (ray job submit, RAY_ADDRESS) or starts a local one."""
    if not ray.is_initialized():
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        if os.environ.get("RAY_ADDRESS") or cluster_started_here():
            ray.init(**quiet)  # what ray.init() joins by itself: RAY_ADDRESS, or the cluster `ray start` made
        else:
            ray.init(include_dashboard=False, **quiet)  # a local one, without the dashboard's processes
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
