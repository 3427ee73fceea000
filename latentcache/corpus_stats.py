"""`latentcache stats`: exact statistics of a VAE's raw latents over a cache or a raw corpus.

Both modes reduce every block of raw latents to a `Partial` (exact per-channel moments, the block's
first rows, a small random sample of values) and merge them on the driver in whatever order they
arrive; Chan's merge in float64 makes the result independent of how the data was partitioned.
From the merged moments come the suggested latent-space constants, one diffusers config fragment
per convention, a percentile-bootstrap interval over shards, and the first-batch estimate that
trainers have traditionally used.

- cache mode (`--cache`): reads the stored latents with `reader.Cache` and undoes the scaling the
  manifest records, on the driver (reading is cheap next to encoding).
- corpus mode (`--input` + `--model`): the encode pipeline up to the encoder, no writing; rows are
  sampled by a seeded hash of (shard, key), so the sample is uniform over all shards.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from . import storage
from .config import ConfigError, EncodeConfig, opt
from .latent_space import LatentSpace, patch_bn_fragment
from .stats import Moments, merge_all, summary

_ENCODE_FIELDS = {f.name: f for f in dataclasses.fields(EncodeConfig)}


def like(name: str, **change: Any) -> Any:
    """The encode option of the same name (default, help, choices), so the two commands cannot drift."""
    f = _ENCODE_FIELDS[name]
    meta = {"default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),  # type: ignore[misc]
            **f.metadata, **change}
    return opt(meta["default"], meta["help"], choices=meta.get("choices"))


@dataclass(frozen=True, kw_only=True)
class StatsConfig:
    cache: str = opt(None, "Describe an existing cache (fsspec URL); the scaling its manifest records is undone.")
    input: str = like("input", help="Describe a raw corpus instead: input shards (fsspec URL, glob or brace range); needs --model.")
    model: str = like("model")
    output: str = opt("stats.json", "Where the statistics document goes (fsspec URL).")
    plot: str = opt(None, "Also write per-channel histograms of the raw latents to this PNG.")
    posterior: str = opt(None, "Which latents to describe: the posterior's mode or a per-key sample (default: what the cache "
                               "stores; mode for a corpus).", choices=("mode", "sample"))
    seed: int = opt(0, "Seed of the row sample, of --posterior sample noise (per key, as encode) and of the bootstrap.")
    max_samples: int = opt(None, "Corpus mode: describe a uniform random sample of this many images drawn over all shards.")
    sample_fraction: float = opt(None, "Corpus mode: describe each image with this probability (seeded by --seed), over all shards.")
    bootstrap: int = opt(1000, "Bootstrap replicates (resampling shards) for the confidence interval; 0 turns it off.")
    confidence: float = opt(0.95, "Confidence level of the interval.")
    batch_size: int = like("batch_size", help="Encoder batch size, and the size of the 'first batch' estimate.")
    plot_samples: int = opt(100_000, "Values per channel kept (a uniform random sample) to draw the histograms.")
    input_format: str = like("input_format")
    image_column: str = like("image_column")
    key_column: str = like("key_column")
    caption_column: str = like("caption_column")
    storage_options: dict = like("storage_options")
    resolution: int = like("resolution")
    max_pixels: int = like("max_pixels")
    min_size: int = like("min_size")
    model_class: str = like("model_class")
    model_config: str = like("model_config")
    allow_pickle: bool = like("allow_pickle")
    dtype: str = like("dtype")
    no_upcast: bool = like("no_upcast")
    num_encoders: int = like("num_encoders")
    decode_cpus: float = like("decode_cpus")
    encoder_threads: int = like("encoder_threads")
    rows_per_block: int = like("rows_per_block")
    config: str = like("config")

    def __post_init__(self) -> None:
        validate_stats(self)

    @property
    def mode(self) -> str:
        return "cache" if self.cache else "corpus"

    def encode_config(self) -> EncodeConfig:
        """The encoder settings for corpus mode: fp32 storage, so nothing is lost before the statistics."""
        shared = {n: getattr(self, n) for n in _ENCODE_FIELDS if hasattr(self, n) and n not in ("output", "posterior", "config")}
        return EncodeConfig(**shared, output=self.output, posterior=self.posterior or "mode", store_dtype="fp32")


def validate_stats(cfg: StatsConfig) -> None:
    if bool(cfg.cache) == bool(cfg.input):
        raise ConfigError("give either --cache (an existing cache) or --input with --model (a raw corpus)")
    if cfg.input and not cfg.model:
        raise ConfigError("--input needs --model (the VAE whose latents to describe)")
    if cfg.cache and (cfg.max_samples is not None or cfg.sample_fraction is not None):
        raise ConfigError("--max-samples and --sample-fraction apply to a raw corpus (--input), not to --cache")
    if cfg.max_samples is not None and cfg.sample_fraction is not None:
        raise ConfigError("give --max-samples or --sample-fraction, not both")
    if cfg.max_samples is not None and cfg.max_samples <= 0:
        raise ConfigError(f"--max-samples must be positive, got {cfg.max_samples}")
    if cfg.sample_fraction is not None and not 0 < cfg.sample_fraction <= 1:
        raise ConfigError(f"--sample-fraction must be in (0, 1], got {cfg.sample_fraction}")
    if not 0 < cfg.confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1, got {cfg.confidence}")
    for name in ("bootstrap", "batch_size", "plot_samples"):
        if getattr(cfg, name) < (0 if name == "bootstrap" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'bootstrap' else 'positive'}")


# ---- per-block partial results (Ray-free) ----------------------------------------------------


@dataclass(frozen=True)
class Partial:
    """What one block contributes: exact moments, its first rows (for the first-batch estimate) and a sample."""

    unit: str  # the bootstrap unit: the input shard the rows came from
    rows: int
    errors: int
    moments: Moments | None
    head: list[tuple[int, Moments]]  # (row position in its shard, that row's moments), first rows only
    sample: np.ndarray  # [C, k] raw values, chosen by `priority` (smallest kept)
    priority: np.ndarray  # [k]

    def to_row(self) -> dict[str, Any]:
        return {"unit": self.unit, "rows": self.rows, "errors": self.errors,
                "moments": json.dumps(self.moments.to_dict()) if self.moments else None,
                "head": json.dumps([[pos, m.to_dict()] for pos, m in self.head]),
                "sample": self.sample.astype(np.float32).tobytes(), "channels": len(self.sample),
                "priority": self.priority.astype(np.float64).tobytes()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Partial":
        moments = Moments.from_dict(json.loads(row["moments"])) if row["moments"] else None
        head = [(pos, Moments.from_dict(m)) for pos, m in json.loads(row["head"])]
        sample = np.frombuffer(row["sample"], np.float32).reshape(row["channels"], -1)
        return cls(row["unit"], row["rows"], row["errors"], moments, head, sample, np.frombuffer(row["priority"], np.float64))

    @classmethod
    def failed(cls, unit: str, errors: int) -> "Partial":
        return cls(unit, 0, errors, None, [], np.zeros((0, 0), np.float32), np.zeros(0))


def partial_of(unit: str, raw: np.ndarray, positions: np.ndarray, *, head: int, sample_size: int, seed: int,
               errors: int = 0) -> Partial:
    """Raw latents [N, C, ...] of one unit (float64) -> its Partial."""
    first = np.argsort(positions, kind="stable")[:head]
    head_rows = [(int(positions[i]), Moments.of(raw[i:i + 1])) for i in first]
    rng = np.random.default_rng(stable_bits(seed, f"{unit}\0{int(positions.min())}"))
    values = np.moveaxis(raw, 1, 0).reshape(raw.shape[1], -1)
    priority = rng.random(values.shape[1])
    sample, priority = lowest(values, priority, sample_size)
    return Partial(unit, len(raw), errors, Moments.of(raw), head_rows, sample.astype(np.float32), priority)


def lowest(values: np.ndarray, priority: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k columns of `values` with the smallest priority: a uniform sample that merges exactly."""
    if len(priority) <= k:
        return values, priority
    keep = np.argpartition(priority, k)[:k]
    return values[:, keep], priority[keep]


def stable_bits(seed: int, text: str) -> int:
    """64 bits from sha256(seed, text): the same on every machine and Python version. (Not
    encode.key_seed: that module loads torch, which sampling workers should not pay for.)"""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "little")


def row_priority(seed: int, shard: str, key: str) -> float:
    """A stable uniform number in [0, 1) per (seed, shard, key): the row sample's coin."""
    return (stable_bits(seed, f"{shard}\0{key}") >> 11) / 2.0**53  # 53 bits: exact in a float, never 1.0


def row_priorities(table: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(u per row, mask of sample rows); shard markers get u = 0 and are not sample rows."""
    keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
    u = np.array([0.0 if k is None else row_priority(seed, s, k) for k, s in zip(keys, shards)])
    return u, np.array([k is not None for k in keys], dtype=bool)


def select_rows(table: pa.Table, *, seed: int, threshold: float) -> pa.Table:
    """Raw rows -> the sampled ones (u < threshold); shard markers pass, so counts still reconcile."""
    u, is_row = row_priorities(table, seed)
    return table.filter(pa.array(~is_row | (u < threshold)))


def lowest_priorities(table: pa.Table, *, seed: int, keep: int) -> pa.Table:
    """Raw rows -> the `keep` smallest row priorities of the block (the --max-samples pre-pass)."""
    u, is_row = row_priorities(table, seed)
    u = u[is_row]
    return pa.table({"u": np.sort(u)[:keep] if len(u) > keep else u})


def block_partials(table: pa.Table, *, space: dict[str, Any], head: int, sample_size: int, seed: int) -> pa.Table:
    """Encoded rows -> one Partial row per (shard, latent shape) of the block (the stats map stage)."""
    from .rows import TENSOR_COLUMNS
    from .sinks import group_rows

    latent_space = LatentSpace.from_dict(space)
    columns = ["key", "shard", "index", "error", "latent_shape", "store_dtype", *TENSOR_COLUMNS]
    rows = [r for r in table.select(columns).to_pylist() if r["key"] is not None]
    out = []
    for unit in dict.fromkeys(r["shard"] for r in rows):
        good = [r for r in rows if r["shard"] == unit and r["error"] is None]
        errors = sum(1 for r in rows if r["shard"] == unit and r["error"] is not None)
        for group in group_rows(good).values():
            raw = latent_space.to_raw(group.tensors["latent"].astype(np.float64))
            positions = np.array([r["index"] for r in group.rows])
            out.append(partial_of(unit, raw, positions, head=head, sample_size=sample_size, seed=seed, errors=errors))
            errors = 0
        if errors:
            out.append(Partial.failed(unit, errors))
    return pa.Table.from_pylist([p.to_row() for p in out], schema=PARTIAL_SCHEMA)


PARTIAL_SCHEMA = pa.schema([("unit", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()), ("moments", pa.string()),
                            ("head", pa.string()), ("sample", pa.binary()), ("channels", pa.int64()),
                            ("priority", pa.binary())])


# ---- the driver's accumulator ----------------------------------------------------------------


class Accumulator:
    """Merges Partials in any order: moments per unit, the global first rows, a bounded sample."""

    def __init__(self, *, head: int, sample_size: int, rank: dict[str, int]) -> None:
        self.head_size, self.sample_size, self.rank = head, sample_size, rank
        self.units: dict[str, Moments] = {}
        self.head: list[tuple[tuple[int, int], Moments]] = []
        self.sample: np.ndarray | None = None
        self.priority = np.zeros(0)
        self.rows = self.errors = 0

    def add(self, p: Partial) -> None:
        self.rows, self.errors = self.rows + p.rows, self.errors + p.errors
        if p.moments is None:
            return
        self.units[p.unit] = self.units[p.unit].merge(p.moments) if p.unit in self.units else p.moments
        order = self.rank.get(p.unit, len(self.rank))
        self.head = sorted(self.head + [((order, pos), m) for pos, m in p.head], key=lambda item: item[0])[:self.head_size]
        values = p.sample if self.sample is None else np.concatenate([self.sample, p.sample], axis=1)
        self.sample, self.priority = lowest(values, np.concatenate([self.priority, p.priority]), self.sample_size)

    def total(self) -> Moments:
        if not self.units:
            raise ConfigError(f"no latents to describe: {self.errors} image(s) failed and none was encoded"
                              if self.errors else "no latents to describe: the input (or the sample) is empty")
        return merge_all(self.units[u] for u in sorted(self.units))


# ---- bootstrap over units --------------------------------------------------------------------


def resampled(count: np.ndarray, offset: np.ndarray, m2: np.ndarray) -> tuple[float, float, float]:
    """Chan's merge of pooled unit moments in closed form (means given as offsets from a centre,
    which keeps the sum of squares well conditioned): returns (count, mean offset, M2)."""
    n = count.sum()
    mean = (count * offset).sum() / n
    return float(n), float(mean), float(m2.sum() + (count * offset * offset).sum() - n * mean * mean)


def bootstrap_interval(units: list[Moments], *, replicates: int, confidence: float, seed: int) -> dict[str, Any] | None:
    """Percentile bootstrap: units drawn with replacement, merged, scaling_factor = 1/std per replicate."""
    if replicates <= 0 or len(units) < 2:
        return None
    pooled = [u.pooled() for u in units]
    count = np.array([p.count[0] for p in pooled], np.float64)
    centre = merge_all(pooled).mean[0]
    offset = np.array([p.mean[0] for p in pooled]) - centre
    m2 = np.array([p.m2[0] for p in pooled])
    rng = np.random.default_rng(seed)
    scaling, shift = np.empty(replicates), np.empty(replicates)
    for r in range(replicates):
        idx = rng.integers(0, len(units), len(units))
        n, mean, sq = resampled(count[idx], offset[idx], m2[idx])
        scaling[r], shift[r] = 1.0 / np.sqrt(max(sq, 0.0) / n), centre + mean
    tail = (1 - confidence) / 2
    bounds = {name: np.quantile(v, [tail, 1 - tail]).tolist() for name, v in (("scaling_factor", scaling), ("shift_factor", shift))}
    return {"level": confidence, "method": "percentile bootstrap", "unit": "shard", "units": len(units),
            "replicates": replicates, "seed": seed, **bounds,
            "scaling_factor_width": bounds["scaling_factor"][1] - bounds["scaling_factor"][0]}


# ---- the statistics document -----------------------------------------------------------------

CONFIG_FRAGMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # keys are latent_space.CONVENTIONS; each value pastes into the VAE's config.json
    "scale": lambda s: {"scaling_factor": s["scaling_factor"]},
    "shift_scale": lambda s: {"scaling_factor": s["scaling_factor"], "shift_factor": s["shift_factor"]},
    # per-channel standardisation does all the scaling, so the global factor is 1
    "per_channel": lambda s: {"scaling_factor": 1.0, "latents_mean": s["latents_mean"], "latents_std": s["latents_std"]},
    "patch_bn": patch_bn_fragment,  # Flux.2: the BatchNorm's running statistics
}


def first_batch(acc: Accumulator, full: dict[str, Any], interval: dict[str, Any] | None) -> dict[str, Any]:
    first = summary(merge_all(m for _, m in acc.head))
    sf, full_sf = first["suggested"]["scaling_factor"], full["suggested"]["scaling_factor"]
    inside = None if interval is None or sf is None else interval["scaling_factor"][0] <= sf <= interval["scaling_factor"][1]
    return {"images": len(acc.head), "mean": first["mean"], "std": first["std"], "scaling_factor": sf,
            "shift_factor": first["mean"], "relative_difference": None if sf is None or not full_sf else sf / full_sf - 1,
            "inside_interval": inside}


def build_document(acc: Accumulator, cfg: StatsConfig, context: dict[str, Any], seconds: float) -> dict[str, Any]:
    total = acc.total()
    full = summary(total)
    interval = bootstrap_interval([acc.units[u] for u in sorted(acc.units)], replicates=cfg.bootstrap,
                                  confidence=cfg.confidence, seed=cfg.seed)
    suggested = full["suggested"]
    return {
        **context,
        "describes": f"raw latents: the VAE encoder's posterior {context['posterior']}, before any scaling or shift",
        "images": acc.rows, "errors": acc.errors, **full,
        "diffusers_config": {name: make(suggested) for name, make in CONFIG_FRAGMENTS.items()} if suggested["scaling_factor"] else None,
        "confidence_interval": interval,
        "first_batch": first_batch(acc, full, interval),
        "moments": total.to_dict(),
        "seconds": round(seconds, 2),
    }


# ---- the two modes ---------------------------------------------------------------------------


def posterior_reader(cache: Any, posterior: str, seed: int) -> tuple[tuple[str, ...], Callable[[Any], np.ndarray]]:
    """(columns to read, block -> raw latents [N, C, ...] in float64) for the requested posterior."""
    stored = cache.manifest.get("posterior", "mode")
    to_raw = lambda arr: cache.space.to_raw(arr.astype(np.float64))  # noqa: E731
    if posterior == stored:
        return ("latent",), lambda block: to_raw(_tensor(block, "latent"))
    if not cache.has_posterior:
        raise ConfigError(f"{cache.root} stores --posterior {stored} latents without the posterior "
                          f"(encode with --store-posterior), so it cannot describe --posterior {posterior}")
    if posterior == "mode":  # a Gaussian's mode is its mean
        return ("posterior_mean",), lambda block: to_raw(_tensor(block, "posterior_mean"))
    return ("posterior_mean", "posterior_std"), functools.partial(_sampled_latents, cache.space, seed)


def _sampled_latents(space: LatentSpace, seed: int, block: Any) -> np.ndarray:
    from .encode import per_key_noise

    mean = space.to_raw(_tensor(block, "posterior_mean").astype(np.float64))
    std = _tensor(block, "posterior_std").astype(np.float64) / space.std_to_model(np.ones(mean.shape[1:]))
    return mean + std * per_key_noise(block.keys, tuple(mean.shape[1:]), seed).numpy().astype(np.float64)


def _tensor(block: Any, name: str) -> np.ndarray:
    if name not in block.tensors:
        raise ConfigError(f"{block.file.path} has no {name!r} column (a codes-only VQ cache has no latents to describe)")
    return block.tensors[name]


def cache_mode(cfg: StatsConfig, progress: bool) -> tuple[Accumulator, dict[str, Any]]:
    from .reader import Cache, CacheError

    try:
        cache = Cache(cfg.cache, storage_options=cfg.storage_options)
    except CacheError as exc:
        raise ConfigError(str(exc)) from None
    posterior = cfg.posterior or cache.manifest.get("posterior", "mode")
    columns, raw_of = posterior_reader(cache, posterior, cfg.seed)
    units = list(dict.fromkeys(f.shard for f in cache.files))
    acc = Accumulator(head=cfg.batch_size, sample_size=cfg.plot_samples, rank={u: i for i, u in enumerate(units)})
    seen: dict[str, int] = {}
    for block in tqdm(cache.blocks(columns), total=len(cache.files), unit="file", desc="stats", disable=not progress):
        raw = raw_of(block)
        start = seen.get(block.file.shard, 0)
        seen[block.file.shard] = start + len(raw)
        acc.add(partial_of(block.file.shard, raw, np.arange(start, start + len(raw)), head=cfg.batch_size,
                           sample_size=cfg.plot_samples, seed=cfg.seed))
    acc.errors = sum(s.get("failed") or 0 for s in cache.manifest["shards"].values())
    return acc, {"mode": "cache", "source": cfg.cache, "model": cache.manifest.get("model"), "posterior": posterior,
                 "current_latent_space": cache.space.to_dict(), "sampling": {"method": "all rows of the cache"}}


def corpus_mode(cfg: StatsConfig, progress: bool) -> tuple[Accumulator, dict[str, Any]]:
    from . import pipeline
    from .models import ModelSpec, check_options, latent_space_for, load_vae
    from .sources import SourceOptions, plan_shards, preflight

    ecfg = cfg.encode_config()
    shards = plan_shards(ecfg.input, ecfg.input_format, ecfg.storage_options)
    preflight(shards, SourceOptions.from_config(ecfg))
    vae, family = load_vae(ModelSpec.from_config(ecfg))
    check_options(family, ecfg, vae)
    space = latent_space_for(vae, ecfg)
    del vae
    pipeline.ensure_ray()
    threshold, sampling = sample_threshold_job(cfg, ecfg, shards, progress)
    acc = Accumulator(head=cfg.batch_size, sample_size=cfg.plot_samples, rank={s.id: i for i, s in enumerate(shards)})
    stats_job(cfg, ecfg, shards, space, threshold, acc, progress)
    return acc, {"mode": "corpus", "source": cfg.input, "model": cfg.model, "posterior": ecfg.posterior,
                 "current_latent_space": space.to_dict(), "shards": len(shards), "sampling": sampling}


def sample_threshold_job(cfg: StatsConfig, ecfg: EncodeConfig, shards: list, progress: bool) -> tuple[float, dict[str, Any]]:
    """The row-sample threshold: none, --sample-fraction itself, or the (N+1)-th smallest u for --max-samples."""
    rule = "a row is kept iff u(seed, shard, key) < threshold, u a sha256-derived uniform number in [0, 1)"
    if cfg.sample_fraction is not None:
        return cfg.sample_fraction, {"method": "bernoulli", "fraction": cfg.sample_fraction, "seed": cfg.seed,
                                     "threshold": cfg.sample_fraction, "rule": rule}
    if cfg.max_samples is None:
        return 1.0, {"method": "all rows"}
    from . import pipeline

    smallest = np.zeros(0)
    bar = tqdm(unit="key", desc="sampling", disable=not progress)
    for row in pipeline.iter_mapped(pipeline.read_dataset(ecfg, shards),
                                    functools.partial(lowest_priorities, seed=cfg.seed, keep=cfg.max_samples + 1)):
        smallest = np.append(smallest, row["u"])
        if len(smallest) > 4 * (cfg.max_samples + 1):
            smallest = np.partition(smallest, cfg.max_samples)[:cfg.max_samples + 1]
        bar.update()
    bar.close()
    threshold = 1.0 if len(smallest) <= cfg.max_samples else float(np.partition(smallest, cfg.max_samples)[cfg.max_samples])
    return threshold, {"method": "bottom-k (uniform without replacement)", "max_samples": cfg.max_samples,
                       "seed": cfg.seed, "threshold": threshold, "rule": rule + "; the threshold keeps the max_samples "
                       "smallest u over all shards (found by a keys-only pass over the shards)"}


def stats_job(cfg: StatsConfig, ecfg: EncodeConfig, shards: list, space: LatentSpace, threshold: float,
              acc: Accumulator, progress: bool) -> None:
    """read -> sample -> preprocess -> encode -> Partials, merged on the driver as they arrive."""
    from . import pipeline

    select = functools.partial(select_rows, seed=cfg.seed, threshold=threshold) if threshold < 1.0 else None
    ds = pipeline.encoded_dataset(ecfg, shards, pipeline.plan_placement(ecfg), select=select)
    stage = functools.partial(block_partials, space=space.to_dict(), head=cfg.batch_size,
                              sample_size=cfg.plot_samples, seed=cfg.seed)
    bar = tqdm(total=cfg.max_samples, unit="img", desc="stats", disable=not progress)
    for row in pipeline.iter_mapped(ds, stage):
        partial = Partial.from_row(row)
        acc.add(partial)
        bar.update(partial.rows + partial.errors)
    bar.close()


MODES: dict[str, Callable[[StatsConfig, bool], tuple[Accumulator, dict[str, Any]]]] = {
    "cache": cache_mode,
    "corpus": corpus_mode,
}


def run_stats(cfg: StatsConfig, *, progress: bool = True) -> dict[str, Any]:
    """Computes the statistics, writes stats.json (and the plot); returns the document."""
    started = time.time()
    acc, context = MODES[cfg.mode](cfg, progress)
    doc = build_document(acc, cfg, {**context, "output": cfg.output, "plot": cfg.plot}, time.time() - started)
    storage.write_bytes(cfg.output, json.dumps(doc, indent=2).encode(), cfg.storage_options)
    if cfg.plot:
        storage.write_bytes(cfg.plot, plot_png(acc.sample, doc), cfg.storage_options)
    return doc


# ---- the plot and the human summary ----------------------------------------------------------


def plot_png(sample: np.ndarray, doc: dict[str, Any]) -> bytes:
    """Per-channel histograms of the sampled raw values (Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(4, len(sample))
    rows = -(-len(sample) // cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    for c, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        if c < len(sample):
            draw_channel(ax, c, sample[c], doc)
        else:
            ax.set_visible(False)
    fig.suptitle(f"raw latents ({doc['posterior']}), {doc['images']} images: "
                 f"suggested scaling_factor {doc['suggested']['scaling_factor'] or float('nan'):.4g}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def draw_channel(ax: Any, c: int, values: np.ndarray, doc: dict[str, Any], bins: int = 80) -> None:
    """Marks the channel mean, the global mean (shift_factor) and mean +- 1/scaling_factor, where the
    suggested scaling puts +-1."""
    mean, sf = doc["mean"], doc["suggested"]["scaling_factor"]
    ax.hist(values, bins=bins, density=True, color="0.6")
    ax.axvline(doc["channel_mean"][c], color="C0", label=f"channel mean {doc['channel_mean'][c]:.3g}")
    ax.axvline(mean, color="C1", linestyle=":", label=f"shift_factor {mean:.3g}")
    for sign in (-1, 1) if sf else ():  # constant latents (std 0) have no suggested scaling
        ax.axvline(mean + sign / sf, color="C3", linestyle="--", label="mean ± 1/scaling_factor" if sign > 0 else None)
    ax.set_title(f"channel {c}: std {doc['channel_std'][c]:.3g}", fontsize=9)
    ax.legend(fontsize=6)


def report_lines(doc: dict[str, Any]) -> list[str]:
    s, ci, fb = doc["suggested"], doc["confidence_interval"], doc["first_batch"]
    lines = [f"{doc['mode']} {doc['source']}: {doc['images']} images ({doc['errors']} failed), "
             f"{len(doc['channel_mean'])} channels, {doc['count']} values, posterior {doc['posterior']}, {doc['seconds']:.1f}s",
             f"raw latents: mean {doc['mean']:.6g}  std {doc['std']:.6g}",
             f"suggested scaling_factor {s['scaling_factor']:.6g}  shift_factor {s['shift_factor']:.6g}"]
    if ci:
        lo, hi = ci["scaling_factor"]
        lines.append(f"{ci['level']:.0%} interval for scaling_factor: [{lo:.6g}, {hi:.6g}] (width {hi - lo:.3g}; "
                     f"bootstrap over {ci['units']} shards, {ci['replicates']} replicates)")
    else:
        lines.append("no confidence interval (needs at least 2 shards and --bootstrap > 0)")
    if fb["scaling_factor"] is not None and fb["relative_difference"] is not None:
        lines.append(f"first batch alone ({fb['images']} images): scaling_factor {fb['scaling_factor']:.6g} "
                     f"({fb['relative_difference']:+.1%} vs all)")
    lines.append(f"per channel: mean {_fmt(doc['channel_mean'])}  std {_fmt(doc['channel_std'])}")
    current = doc["current_latent_space"]
    lines.append(f"current {current['convention']} convention: scaling_factor {current['scaling_factor']:.6g}")
    lines.append(f"wrote {doc['output']}" + (f" and {doc['plot']}" if doc.get("plot") else ""))
    return lines


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
