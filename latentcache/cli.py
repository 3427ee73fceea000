"""`latentcache <command>`: parse, call, print a summary, exit with a status a scheduler can gate on.

Exit status: 0 complete; 2 bad usage or unusable input/model (one line on stderr, no traceback);
3 the run finished but some shards failed (rerun to resume them); 1 (audit) an integrity check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import EncodeConfig, add_dataclass_arguments, build_config
from .console import native_stderr_filter, print_summary, quiet_libraries
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


def flags_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "quiet", "verbose", "command")}


VERBOSE_HELP = "Show everything: our INFO logs and every library's messages (Ray, diffusers)."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentcache", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"latentcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    encode = sub.add_parser(
        "encode",
        help="Encode image shards into a latent cache.",
        usage="latentcache encode --input URL --output URL --model MODEL [options]",
        description="Encode image shards into a latent cache (one output file per input shard). "
        "Options may also come from a YAML file (--config); flags override it.",
    )
    add_dataclass_arguments(encode, EncodeConfig)
    encode.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    encode.set_defaults(func=cmd_encode)
    demo = sub.add_parser("demo", help="Make sample shards and a small random VAE, then encode them.")
    demo.add_argument("--workdir", default="demo", help="Where the sample shards, model and cache go (default: demo).")
    demo.add_argument("--shards", type=int, default=4, help="Number of sample shards (default: 4).")
    demo.add_argument("--per-shard", type=int, default=32, help="Images per shard (default: 32).")
    demo.set_defaults(func=cmd_demo)
    from .audit import AuditConfig

    audit = sub.add_parser(
        "audit",
        help="Check a cache's integrity and reconstruction quality (exit 1 on failure).",
        description="Integrity and reconstruction audit; writes "
        "CACHE/__latentcache__/audit/{metrics.parquet,summary.json,report.html}.",
    )
    add_dataclass_arguments(audit, AuditConfig)
    audit.set_defaults(func=cmd_audit)
    from .corpus_stats import StatsConfig

    stats = sub.add_parser(
        "stats",
        help="Exact latent statistics and suggested scaling over a cache or a raw corpus.",
        description="Exact latent statistics (mean/std per channel), suggested scaling_factor, "
        "shift_factor and latents_mean/std with a bootstrap interval.",
    )
    add_dataclass_arguments(stats, StatsConfig)
    stats.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    stats.set_defaults(func=cmd_stats)
    for command in (encode, demo, audit, stats):  # also after the command: `latentcache encode ... -v`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        quiet_libraries()
    # Only a real process stderr is filtered (not one a test harness captures in Python).
    filtered = not args.verbose and sys.stderr is sys.__stderr__
    with native_stderr_filter() if filtered else contextlib.nullcontext():
        return run_command(args)


def run() -> None:
    """The `latentcache` command: main(), then an immediate exit. Tearing down an interpreter that
    holds torch, diffusers and Ray takes about 2 s; by now Ray is shut down and every output written."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(args: argparse.Namespace) -> int:
    """Runs the subcommand; a Ray this call started is shut down before returning (no RPC noise at exit)."""
    ray_before = ray_running()
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        message = exc if isinstance(exc, UserError) else describe(exc)
        print(f"latentcache: error: {' '.join(str(message).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        if not ray_before and ray_running():
            import ray

            ray.shutdown()


def ray_running() -> bool:
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return bool(ray is not None and ray.is_initialized())
