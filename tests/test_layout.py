"""The house rules a test can check: no import cycles, no module over 400 lines, light readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_and_no_module_over_400_lines():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "import_cycles.py")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 import cycle(s)" in result.stdout


def loaded_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return set(out.split())


def test_the_training_reader_loads_neither_diffusers_nor_ray_nor_the_encoder():
    loaded = loaded_by("latentcache.data")
    assert not {m for m in loaded if m.split(".")[0] in ("diffusers", "ray")}
    assert not {"latentcache.encode", "latentcache.tiling", "latentcache.models"} & loaded


def test_seeding_and_the_moments_load_without_torch():
    for module in ("latentcache.seeding", "latentcache.stats"):
        assert "torch" not in loaded_by(module), module
