"""What the terminal shows: our lines first, library chatter kept out unless --verbose.

Python loggers are quietened by level (quiet_libraries). Ray's core worker is C++ and writes to
file descriptor 2 directly, so its known-noise lines can only be filtered there: native_stderr_filter
puts a pipe on fd 2 for the duration of a command and forwards every line that is not known noise,
while Python's own sys.stderr (progress bars, tracebacks) keeps writing to the terminal directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any

# Ray Data hands its own object refs to every actor it creates, so Ray core flags every encoder
# actor (ray-project/ray#57733); nothing in our arguments causes it and restarts still work.
NATIVE_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
)
# Loggers whose warnings describe Ray's or diffusers' defaults rather than anything the user did.
QUIET_LOGGERS = {
    # "token auth is enabled" (our default too)
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}


def quiet_libraries() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def _forward(read_fd: int, out_fd: int) -> None:
    pending = b""
    while chunk := os.read(read_fd, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        kept = [line + b"\n" for line in lines if not any(p.search(line) for p in NATIVE_NOISE)]
        if kept:
            os.write(out_fd, b"".join(kept))
    if pending:
        os.write(out_fd, pending)
    os.close(read_fd)


@contextlib.contextmanager
def native_stderr_filter() -> Iterator[None]:
    """Native writes to fd 2 go through the noise filter; Python's sys.stderr keeps the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_fd, write_fd = os.pipe()
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(
        os.dup(terminal), "w", buffering=1, encoding=python_stderr.encoding, errors="backslashreplace"
    )
    os.dup2(write_fd, 2)
    os.close(write_fd)
    forwarder = threading.Thread(target=_forward, args=(read_fd, terminal), name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(terminal, 2)  # the pipe's last writer (fd 2) is gone: the forwarder drains and stops
        forwarder.join(timeout=2)
        if not forwarder.is_alive():  # else a child process still holds the pipe: leave the forwarder its fd
            os.close(terminal)


def quiet_ray_data() -> None:
    """Ray Data's console handler prints INFO ("execution finished"); ours is the progress bar. We
    also turn Ray Data's own bars off (one bar per shard is ours), which it would warn about once."""
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    if not logging.getLogger().isEnabledFor(logging.INFO):  # the CLI's --verbose sets INFO
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.WARNING)


def plan_lines(cfg: Any, shards: int, todo: int, placement: Any) -> str:
    """What runs where, printed before the progress bar."""
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    device = (
        f"{placement.encoder_gpus:g} GPU each"
        if placement.encoder_gpus
        else f"CPU, {placement.encoder_threads} threads"
    )
    skipped = f" ({shards - todo} already committed, skipped)" if shards != todo else ""
    return (
        f"encoding {todo} of {shards} shards{skipped}: {cfg.input} -> {cfg.output}\n"
        f"encoder: {cfg.model} ({cfg.dtype}), {placement.num_encoders} actor(s) ({device}), "
        f"on Ray: {nodes} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
    )


# ---- the run summary a command prints -------------------------------------------------------------


def print_summary(summary: dict[str, Any]) -> None:
    c = summary["counts"]
    print(
        f"cache: {summary['output']}  ({summary['committed']}/{summary['shards']} shards committed, "
        f"{c['written']} written, {c['failed']} failed of {c['input']} input)"
    )
    print(this_run(summary))
    print(f"manifest: {summary['manifest']}\nstats: {summary['stats']}\nerrors: {summary['errors']}")
    if summary["failed_shards"]:
        print("INCOMPLETE: failed shards (rerun the same command to resume):")
        for shard, reason in summary["failed_shards"].items():
            print(f"  {shard}: {reason}")


def this_run(summary: dict[str, Any]) -> str:
    """What this run did: a resume says what it skipped; throughput only over what it encoded."""
    seconds, skipped = summary["seconds"], summary.get("skipped_shards", 0)
    encoded, images = summary["shards"] - skipped, summary.get("encoded_input", summary["counts"]["input"])
    skip = f"{skipped} shard{'s' * (skipped != 1)} already committed, skipped" if skipped else ""
    if encoded == 0:
        return f"this run: nothing to encode ({skip or 'no shards'}), {seconds:.1f}s"
    rate = f", {images / seconds:.1f} images/s" if seconds and images else ""
    return f"this run: {encoded} shard{'s' * (encoded != 1)} read, {images} images in {seconds:.1f}s{rate}" + (
        f" ({skip})" if skip else ""
    )
