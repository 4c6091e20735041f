"""A non-editable wheel ships the configs and recipes, and the installed copy composes them (offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


def test_wheel_ships_configs_and_installed_copy_works(tmp_path):
    # build from a copy, so the checkout gets no build/ folder (other test runs may share it)
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "outputs",
                                                                "__pycache__", ".*cache", ".venv", "bench"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # offline: no index lookups
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheels"), str(source)], capture_output=True, text=True, env=env,
                           timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheels = list((tmp_path / "wheels").glob("llmprune-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert "llmprune/conf/base.yaml" in names
    assert {f"llmprune/recipes/{r}" for r in RECIPES} <= names, sorted(n for n in names if "recipes" in n)
    assert RECIPES and "llmprune/adapters/llama.py" in names and "llmprune/__main__.py" in names
    assert {"llmprune/backends/megatron/convert.py", "llmprune/backends/megatron/adapter.py"} <= names

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site),
                              str(wheels[0])], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    check = (
        "import json, llmprune\n"
        "from llmprune.config import conf_dir, recipes_dir\n"
        "cfg = llmprune.load_config('smollm2_minitron', ['prune.export_config.hidden_size=512'])\n"
        "print(json.dumps({'file': llmprune.__file__, 'recipes': llmprune.list_recipes(), 'conf': str(conf_dir()),\n"
        "                  'recipes_dir': str(recipes_dir()), 'hidden': cfg.prune.export_config.hidden_size,\n"
        "                  'output_dir': cfg.output_dir, 'path': cfg.model.path}))\n"
    )
    run_env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy first, ahead of the editable install
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(site), info["file"]
    assert Path(info["conf"]) == site / "llmprune" / "conf" and Path(info["recipes_dir"]).is_relative_to(site)
    assert info["recipes"] == [r.removesuffix(".yaml") for r in RECIPES]
    assert (info["hidden"], info["output_dir"], info["path"]) == (512, "outputs/smollm2_minitron", "embedded:smollm2")
