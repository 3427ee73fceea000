"""`latentcache <command>`: parse, call, print a summary, exit with a status a scheduler can gate on.

Exit status: 0 complete; 2 bad usage or unusable input/model (one line on stderr, no traceback);
3 the run finished but some shards failed (rerun to resume them); 1 (audit) an integrity check failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .config import EncodeConfig, add_dataclass_arguments, build_config
from .errors import UserError
from .storage import describe

EXIT_USAGE, EXIT_INCOMPLETE = 2, 3
EXIT_AUDIT_FAILED = 1
# What a user can fix: one line, exit 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, PermissionError)


def cmd_encode(args: argparse.Namespace) -> int:
    from .pipeline import run_encode

    cfg = build_config(EncodeConfig, flags_of(args))
    summary = run_encode(cfg, progress=not args.quiet)
    print_summary(summary)
    return 0 if summary["complete"] else EXIT_INCOMPLETE


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import AuditConfig, format_summary, run_audit

    summary = run_audit(build_config(AuditConfig, flags_of(args)))  # no manifest at --cache: CacheError, exit 2
    print(format_summary(summary))
    return 0 if summary["ok"] else EXIT_AUDIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir), shards=args.shards, per_shard=args.per_shard)


def cmd_stats(args: argparse.Namespace) -> int:
    from .corpus_stats import StatsConfig, report_lines, run_stats

    doc = run_stats(build_config(StatsConfig, flags_of(args)), progress=not args.quiet)
    print("\n".join(report_lines(doc)))
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    rate = c["input"] / summary["seconds"] if summary["seconds"] else 0.0
    print(f"cache: {summary['output']}  ({summary['committed']}/{summary['shards']} shards committed, "
          f"{c['written']} written, {c['failed']} failed of {c['input']} input, {summary['seconds']:.1f}s, {rate:.1f} images/s)")
    print(f"manifest: {summary['manifest']}\nstats: {summary['stats']}\nerrors: {summary['errors']}")
    if summary["failed_shards"]:
        print("INCOMPLETE: failed shards (rerun the same command to resume):")
        for shard, reason in summary["failed_shards"].items():
            print(f"  {shard}: {reason}")


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "quiet", "verbose", "command")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentcache", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress details.")
    sub = parser.add_subparsers(dest="command", required=True)
    encode = sub.add_parser("encode", help="Encode image shards into a latent cache.",
                            description="Encode image shards into a latent cache (one output file per input shard).")
    add_dataclass_arguments(encode, EncodeConfig)
    encode.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    encode.set_defaults(func=cmd_encode)
    demo = sub.add_parser("demo", help="Make sample shards and a small random VAE, then encode them.")
    demo.add_argument("--workdir", default="demo", help="Where the sample shards, model and cache go (default: demo).")
    demo.add_argument("--shards", type=int, default=4, help="Number of sample shards (default: 4).")
    demo.add_argument("--per-shard", type=int, default=32, help="Images per shard (default: 32).")
    demo.set_defaults(func=cmd_demo)
    from .audit import AuditConfig

    audit = sub.add_parser("audit", help="Check a cache's integrity and reconstruction quality (exit 1 on failure).",
                           description="Integrity and reconstruction audit; writes OUT/_audit/{metrics.parquet,summary.json,report.html}.")
    add_dataclass_arguments(audit, AuditConfig)
    audit.set_defaults(func=cmd_audit)
    from .corpus_stats import StatsConfig

    stats = sub.add_parser("stats", help="Exact latent statistics and suggested scaling over a cache or a raw corpus.",
                           description="Exact latent statistics (mean/std per channel), suggested scaling_factor, "
                                       "shift_factor and latents_mean/std with a bootstrap interval.")
    add_dataclass_arguments(stats, StatsConfig)
    stats.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    stats.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"latentcache: error: {exc if isinstance(exc, UserError) else describe(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
