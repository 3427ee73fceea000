"""Every ```bash and ```python block of README.md and docs/*.md runs, so a crashing snippet fails CI.

Blocks run in a temporary directory where `latentcache demo` (4 shards of 4 images) has already made `demo/shards`,
`demo/vae` and `demo/cache`: python blocks in this process (a fresh namespace each, on the test
session's Ray), shell blocks with `bash -euo pipefail` and this interpreter's environment first on
PATH. A block that cannot run here (object storage, a cluster, a GPU, the network) must say so in
an HTML comment on the line right before it, with a reason:

    <!-- not-run: needs S3 credentials -->

The test reads whatever blocks the documents hold when it runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from latentcache.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
RUN_LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
SHELL_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    kind: str  # "shell" or "python"
    body: str
    not_run: str | None  # the reason, when the line before says it cannot run here

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def marker_before(text: str, start: int) -> str | None:
    """The not-run reason on the line right before a fence (stripped; '' when empty), else None."""
    previous = text[:start].rstrip("\n").rsplit("\n", 1)[-1]
    match = NOT_RUN.match(previous)
    return match.group("reason").strip() if match else None


def doc_blocks(doc: Path) -> list[Block]:
    text = doc.read_text()
    return [
        Block(
            doc,
            text.count("\n", 0, m.start()) + 1,
            RUN_LANGS[m.group("lang")],
            textwrap.dedent(m.group("body")),
            marker_before(text, m.start()),
        )
        for m in FENCE.finditer(text)
        if m.group("lang") in RUN_LANGS
    ]


BLOCKS = [b for doc in DOCS for b in doc_blocks(doc)]
RUNNABLE = [b for b in BLOCKS if b.not_run is None]


def test_the_documents_have_runnable_blocks():
    assert any(b.kind == "python" for b in RUNNABLE) and any(b.kind == "shell" for b in RUNNABLE), [
        b.id for b in RUNNABLE
    ]


def test_every_skipped_block_says_why():
    assert not [b.id for b in BLOCKS if b.not_run == ""], "a not-run marker needs a reason"


def test_every_not_run_marker_sits_right_before_a_block():
    for doc in DOCS:
        text = doc.read_text()
        fences = {text.count("\n", 0, m.start()) for m in FENCE.finditer(text)}  # 0-based line of each fence
        for number, line in enumerate(text.split("\n")):
            if NOT_RUN.match(line):
                assert number + 1 in fences, f"{doc.name}:{number + 1}: not-run marker not followed by a code block"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_session) -> Path:
    root = tmp_path_factory.mktemp("docs")
    assert main(["demo", "--workdir", str(root / "demo"), "--shards", "4", "--per-shard", "4"]) == 0
    (root / "configs").symlink_to(ROOT / "configs")  # the docs run from a clone's root: configs/ is there
    return root


S3_BUCKET = "my-bucket"  # the bucket the docs' object-storage examples name


@pytest.fixture(scope="module")
def docs_s3(s3_server, workdir) -> dict[str, str]:
    """A loopback S3 holding the demo shards at s3://my-bucket/shards/, as the docs' S3 examples assume;
    returns the AWS_* variables (endpoint included) that point botocore at it."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=S3_BUCKET)
    for shard in sorted((workdir / "demo" / "shards").glob("*.tar")):
        client.upload_file(str(shard), S3_BUCKET, f"shards/{shard.name}")
    return env


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(ROOT)
    return env


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs(block, workdir, monkeypatch, capsys, request):
    monkeypatch.chdir(workdir)
    env = shell_env()
    if f"s3://{S3_BUCKET}" in block.body:
        env.update(request.getfixturevalue("docs_s3"))
    if block.kind == "python":
        exec(compile(block.body, block.id, "exec"), {"__name__": "__doc_block__"})
        return
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.body],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=SHELL_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block.id} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
