"""The command line a new user meets: --version, grouped help with defaults, one-line errors."""

from __future__ import annotations

import argparse
import re

import pytest

from latentcache import __version__
from latentcache.cli import build_parser, main, run_command
from latentcache.config import HELP_GROUPS
from latentcache.console import this_run
from latentcache.storage import describe


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"latentcache {__version__}"


def encode_help() -> str:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["encode"].format_help()


def test_encode_help_is_grouped_and_shows_every_default():
    text = encode_help()
    titles = [
        HELP_GROUPS[g] for g in ("input", "model", "preprocessing", "latents", "output", "performance", "cluster")
    ]
    positions = [text.index(f"\n{t}:\n") for t in titles]
    assert positions == sorted(positions)
    entries = re.split(r"\n  (?=--)", text.split("\ninput: ")[1])[1:]  # one entry per flag, help text included
    for entry in entries:
        flat = " ".join(entry.split())
        assert "default" in flat or flat.split(" ", 2)[-1].startswith("Required."), flat
    flat = " ".join(text.split())
    assert "--min-size MIN_SIZE Images whose shorter side" in flat and "(default: 0)" in flat
    assert re.search(r"--seed SEED .*?\(default: 0\)", flat)


@pytest.mark.parametrize(
    "body, phrases",
    [
        ("resolution: 64\nbatch_size: [1\n", ["line 2", "not valid YAML"]),
        ("resolution: 64\nresolutoin: 128\n", ["line 2", "unknown option 'resolutoin'", "did you mean 'resolution'?"]),
        ("model_clas: kl\n", ["line 1", "did you mean 'model-class'?"]),
        ("batch_size: 8\nresolution: big\n", ["line 2", "--resolution: expected int"]),
    ],
)
def test_yaml_errors_name_the_file_the_line_and_the_closest_key(body, phrases, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(body)
    assert main(["encode", "--config", str(path), "--input", "x.tar", "--output", "out", "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err, err
    for phrase in phrases:
        assert phrase in err, err


def test_missing_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert (
        main(["encode", "--input", str(tmp_path / "none-*.tar"), "--output", str(tmp_path / "o"), "--model", "m"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("latentcache: error:") and "no input files match" in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    """Only UserError (and a missing or forbidden file) is one line: any other exception propagates."""

    def broken(args):
        raise ValueError("a bug, not a user error")

    with pytest.raises(ValueError, match="a bug"):
        run_command(argparse.Namespace(func=broken))


def test_describe_masks_secret_storage_option_values():
    options = {
        "key": "AKIA-visible-id",
        "secret": "s3cr3t-value",
        "client_kwargs": {"session_token": "tok-123"},
        "endpoint_url": "http://127.0.0.1:9000",
    }
    text = describe(PermissionError(f"denied for s3cr3t-value with tok-123 at {options['endpoint_url']}"), options)
    assert "s3cr3t-value" not in text and "tok-123" not in text and "http://127.0.0.1:9000" in text


def summary(**kw):
    base = {"shards": 4, "seconds": 2.0, "counts": {"input": 40}, "skipped_shards": 0, "encoded_input": 40}
    return {**base, **kw}


def test_run_line_reports_throughput_only_over_what_was_encoded():
    assert this_run(summary()) == "this run: 4 shards read, 40 images in 2.0s, 20.0 images/s"
    assert (
        this_run(summary(skipped_shards=4, encoded_input=0))
        == "this run: nothing to encode (4 shards already committed, skipped), 2.0s"
    )
    assert (
        this_run(summary(skipped_shards=3, encoded_input=10))
        == "this run: 1 shard read, 10 images in 2.0s, 5.0 images/s (3 shards already committed, skipped)"
    )


def test_a_resume_that_encodes_nothing_says_so(ray_session, kl_model, shards, tmp_path, capsys):
    flags = [
        "encode",
        "--quiet",
        "--input",
        str(shards[0]),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(kl_model),
        "--resolution",
        "64",
    ]
    assert main(flags) == 0
    assert "images/s" in capsys.readouterr().out
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "nothing to encode (1 shard already committed, skipped)" in out and "images/s" not in out
