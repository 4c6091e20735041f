"""A run SIGKILLed in the middle of writing an artifact resumes to the uninterrupted run's result.

The killed run is `python -m llmprune` in a subprocess whose safetensors writer (of the distillation checkpoint, or of
importance.safetensors at the end of calibration) writes half the file and then sends SIGKILL to its own process:
a kill at exactly that instant, with no exception handler or `finally` running. The same command run again must
finish with the weights, plan and metrics of a run that was never interrupted (one thread everywhere, so the two are
bit for bit comparable).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides
from safetensors.torch import load_file

import llmprune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2_minitron"
STEPS = 4
EXTRA = (
    "prune.export_config.hidden_size=40",
    "prune.export_config.ffn_hidden_size=48",
    f"distill.max_steps={STEPS}",
    "distill.save_every=1",
    "distill.eval_every=2",
)

# Run the CLI with save_file in `module` replaced by one that, for the file whose path contains `marker`, writes
# half of it and kills the process.
KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    module_name, marker = sys.argv[1], sys.argv[2]
    module = importlib.import_module(module_name)
    real_save_file = module.save_file

    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if marker in str(filename):
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    module.save_file = save_file
    from llmprune.__main__ import main

    sys.exit(main(sys.argv[3:]))
""")


def run_killed(tmp_path: Path, module: str, marker: str, args: list[str]) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(script), module, marker, f"recipe={RECIPE}", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, f"exit {result.returncode}, not killed:\n{result.stderr[-3000:]}"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def same_weights(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two exported folders (asserting they hold the same names)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return [k for k in wa if not torch.equal(wa[k], wb[k])]


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "distill_metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def hidden_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    llmprune.run(RECIPE, tiny_run_overrides(tiny_model_dirs["llama"], out, *EXTRA))
    return out


def test_kill_inside_a_checkpoint_write_resumes_from_the_previous_one(
    reference, tiny_model_dirs, tmp_path, llmprune_log
):
    out = tmp_path / "run"
    args = tiny_run_overrides(tiny_model_dirs["llama"], out, *EXTRA)
    run_killed(tmp_path, "llmprune.distill.checkpoint", "step_000003", args)
    ckpt = out / "distill_ckpt"
    partial = ckpt / ".step_000003.tmp" / "model.safetensors"
    assert partial.is_file(), sorted(p.name for p in ckpt.iterdir())  # killed inside step 3's write
    assert (ckpt / "latest").read_text() == "step_000002" and not (ckpt / "step_000003").exists()
    assert not (out / "final").exists() and not (out / "report.json").exists()

    llmprune.run(RECIPE, args)
    assert f"distill: resuming from {ckpt / 'step_000002'} (step 2 of {STEPS})" in llmprune_log, llmprune_log
    assert same_weights(reference / "final", out / "final") == []
    assert metric_rows(out) == metric_rows(reference)
    assert (ckpt / "latest").read_text() == f"step_{STEPS:06d}"
    assert hidden_files(out) == []  # the half-written step went with the rewrite of step 3


def test_kill_inside_the_calibration_write_calibrates_again(reference, tiny_model_dirs, tmp_path, llmprune_log):
    out = tmp_path / "run"
    args = tiny_run_overrides(tiny_model_dirs["llama"], out, *EXTRA)
    run_killed(tmp_path, "llmprune.stages.calibration", "importance", args)
    assert (out / ".importance.safetensors.tmp").is_file()  # killed inside the write
    assert not (out / "importance.safetensors").exists() and not (out / "plan.json").exists()

    llmprune.run(RECIPE, args)
    assert not any("reusing" in line for line in llmprune_log), llmprune_log
    assert (out / "plan.json").read_text() == (reference / "plan.json").read_text()
    scores, expected = (
        load_file(str(out / "importance.safetensors")),
        load_file(str(reference / "importance.safetensors")),
    )
    assert scores.keys() == expected.keys() and all(torch.equal(scores[k], expected[k]) for k in scores)
    assert same_weights(reference / "pruned", out / "pruned") == []
    assert same_weights(reference / "final", out / "final") == []
    assert hidden_files(out) == []
