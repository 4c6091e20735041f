"""The sections of bench/gpu_check.sh, one process each (run that script; this file is its worker).

  python bench/gpu_check.py pytest                   the GPU-marked tests (pytest -m gpu), in this process
  python bench/gpu_check.py recipe   OUT [k=v ...]   the default recipe (bf16 distillation) on the GPU, then its
                                                     distillation step against its parts measured alone
  torchrun --nproc_per_node=1 bench/gpu_check.py fsdp OUT [k=v ...]
                                                     the same recipe, distill.strategy=fsdp on one process (nccl)
  torchrun --nproc_per_node=1 bench/gpu_check.py megatron OUT [k=v ...]
                                                     backend=megatron, TransformerEngine layers where they import
  python bench/gpu_check.py summary LOGS RESULT.md   bench/results/gpu.{md,json} from the sections' logs

Every section ends by printing one line `GPU_CHECK_RESULT {json}` (rank 0) with its numbers and the peak GPU memory
of its process (torch.cuda.max_memory_allocated); the summary reads those lines, so a section that died without one
is reported as failed. The recipe sections call `llmprune.__main__.main`, the command line itself.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MARK = "GPU_CHECK_RESULT "
RECIPE = "smollm2_minitron"


def device() -> torch.device:
    """cuda (cuda:LOCAL_RANK under torchrun), or cpu when the script was asked to rehearse on a CPU."""
    if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def emit(section: str, **numbers) -> None:
    print(MARK + json.dumps({"section": section, **numbers}, default=str), flush=True)


def cli(out: Path, overrides: list[str]) -> dict:
    """`python -m llmprune recipe=RECIPE output_dir=OUT model.device=... OVERRIDES` in this process; its report."""
    from llmprune.__main__ import main

    dev = device()
    argv = [f"recipe={RECIPE}", f"output_dir={out}", f"model.device={dev}", *overrides]
    print("llmprune " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"gpu_check: python -m llmprune exited with {code}")
    return json.loads((out / "report.json").read_text())


def step_seconds(run_dir: Path, eval_every: int, save_every: int) -> list[float]:
    """Wall seconds of each distillation step from train()'s own clock (distill_metrics.jsonl), leaving out the
    first step (warm-up) and steps that follow an evaluation or a checkpoint (their clock includes it)."""
    rows = [json.loads(line) for line in (run_dir / "distill_metrics.jsonl").read_text().splitlines() if line]
    out = []
    for before, row in zip(rows, rows[1:]):
        if before["step"] % eval_every and before["step"] % save_every:
            out.append(row["seconds"] - before["seconds"])
    return out


def section_pytest() -> None:
    import pytest

    dev = device()
    outcomes: dict[str, int] = {}

    class Count:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1

    started = time.perf_counter()
    code = pytest.main(["-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", str(ROOT / "tests")], plugins=[Count()])
    emit("pytest", exit_code=int(code), outcomes=outcomes, seconds=round(time.perf_counter() - started, 1),
         peak_gib=peak_gib(dev))
    if code != 0 or not outcomes.get("passed"):
        raise SystemExit(f"gpu_check: pytest -m gpu exited with {int(code)}, outcomes {outcomes}: a GPU test failed or "
                         "none passed (a test that needs the GPU skips without one)")


def section_recipe(out: Path, overrides: list[str]) -> None:
    """The default recipe with bf16 distillation, then one distillation step's parts alone on the same batch shape:
    student forward + backward (LM loss) and teacher forward under the same autocast (bench/distill_speed.py does
    the same on the CPU)."""
    from transformers import AutoModelForCausalLM

    from llmprune import load_config
    from llmprune.distill import losses
    from llmprune.distill.train import autocast_dtype
    from llmprune.evaluate import predicting_positions
    from llmprune.models import load_model
    from llmprune.pipeline import load_data

    dev = device()
    overrides = ["distill.precision=bf16", *overrides] if dev.type == "cuda" else overrides
    started = time.perf_counter()
    report = cli(out, overrides)
    wall = time.perf_counter() - started
    recipe_peak = peak_gib(dev)
    cfg = load_config(RECIPE, [f"output_dir={out}", f"model.device={dev}", *overrides])
    d = cfg.distill
    steps = step_seconds(out, d.eval_every, d.save_every)
    step = statistics.median(steps)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    teacher, tokenizer, _ = load_model(cfg.model.path, cfg.model.gguf_file, cfg.model.dtype, str(dev))
    teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(out / "pruned", dtype=teacher.dtype).to(dev).train()
    ids = load_data(cfg.data, tokenizer, cfg.seed).train[: d.micro_batch_size].to(dev)  # one micro-batch
    dtype = autocast_dtype(d.precision, dev)
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype is not None else nullcontext
    keep = predicting_positions(ids)

    def student_fwd_bwd():
        student.zero_grad(set_to_none=True)
        with autocast():
            logits = student(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
            loss = losses.lm_loss(logits, ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.float32))
        loss.backward()

    def teacher_fwd():
        with torch.no_grad(), autocast():
            teacher(input_ids=ids, use_cache=False, logits_to_keep=keep)

    def median_seconds(fn, n: int = 10) -> float:
        fn()  # warm-up
        times = []
        for _ in range(n):
            sync(dev)
            start = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    parts = {"student_fwd_bwd_s": median_seconds(student_fwd_bwd), "teacher_fwd_s": median_seconds(teacher_fwd)}
    accum = d.global_batch_size // d.micro_batch_size  # micro-batches per step (one process)
    parts_total = accum * sum(parts.values())
    emit("recipe", wall_s=round(wall, 1), timings_s=report["timings_s"], autocast=str(dtype),
         distill_steps=report["distill"]["steps"], step_median_s=round(step, 4), steps_timed=len(steps),
         tokens_per_s=round(d.global_batch_size * cfg.data.seq_len / step),
         **{k: round(v, 4) for k, v in parts.items()},
         parts_per_step_s=round(parts_total, 4), efficiency=round(parts_total / step, 3),
         perplexity={k: round(v["perplexity"], 3) for k, v in report["eval"].items()},
         peak_gib=recipe_peak, parts_peak_gib=peak_gib(dev))


def section_fsdp(out: Path, overrides: list[str]) -> None:
    """distill.strategy=fsdp on one process: the process group is made here (nccl), since `python -m llmprune`
    makes one only for several processes, so FSDP2 shards the student over a one-rank mesh."""
    import torch.distributed as dist

    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    seen: list[str] = []

    class Remember(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logging.getLogger("llmprune").addHandler(Remember())
    try:
        precision = ["distill.precision=bf16"] if dev.type == "cuda" else []
        started = time.perf_counter()
        report = cli(out, ["distill.strategy=fsdp", *precision, *overrides])
        wall = time.perf_counter() - started
        fsdp = [m for m in seen if "FSDP2 over" in m]
        if dist.get_rank() == 0:
            emit("fsdp", backend=dist.get_backend(), wall_s=round(wall, 1), fsdp_log=fsdp,
                 distill_steps=report["distill"]["steps"], distill_s=report["timings_s"].get("distill"),
                 final_perplexity=round(report["eval"]["final"]["perplexity"], 3), peak_gib=peak_gib(dev))
        if not fsdp:
            raise SystemExit("gpu_check: the run did not train under FSDP2 (no 'FSDP2 over' log line)")
    finally:
        dist.destroy_process_group()


def section_megatron(out: Path, overrides: list[str]) -> None:
    """backend=megatron at TP=1 on one GPU: TransformerEngine layers where transformer_engine imports (requested
    explicitly, so a silent fallback to local layers cannot pass for them), megatron-core's own layers otherwise."""
    dev = device()
    try:
        import megatron.core  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"gpu_check: megatron-core does not import ({err}); pip install megatron-core") from err
    try:
        import transformer_engine  # noqa: F401

        impl, why = "transformer_engine", "transformer_engine imports"
    except Exception as err:  # ImportError, or a CUDA library mismatch raised while loading it
        impl, why = "local", f"transformer_engine does not import: {type(err).__name__}: {err}"
    if dev.type != "cuda":
        impl = "local"
    print(f"megatron.transformer_impl={impl} ({why})", flush=True)
    started = time.perf_counter()
    report = cli(out, ["backend=megatron", "megatron.tensor_parallel_size=1", f"megatron.transformer_impl={impl}",
                       *overrides])
    emit("megatron", transformer_impl=impl, why=why, wall_s=round(time.perf_counter() - started, 1),
         timings_s=report["timings_s"], params=report["params"],
         pruned_perplexity=round(report["eval"]["pruned"]["perplexity"], 3),
         export_check=report.get("export_check", {}).get("pruned"), peak_gib=peak_gib(dev))


# -- summary --------------------------------------------------------------------------------------------------------
SECTIONS = ("pytest", "recipe", "fsdp", "megatron")


def git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def gpu_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    else:
        info["gpu"] = "none (CPU rehearsal: GPU_CHECK_ALLOW_CPU=1)"
    return info


def summary(logs: Path, result: Path) -> int:
    """gpu.md / gpu.json from the sections' logs and exit codes (LOGS/<section>.log, LOGS/<section>.rc,
    LOGS/<section>.seconds). Returns the number of failed sections."""
    rows, payload, failed = [], {"sections": {}}, []
    for name in SECTIONS:
        log = logs / f"{name}.log"
        if not log.exists():
            continue
        text = log.read_text(errors="replace")
        rc = int((logs / f"{name}.rc").read_text().strip() or 1)
        seconds = float((logs / f"{name}.seconds").read_text().strip() or 0)
        results = [json.loads(line[len(MARK):]) for line in text.splitlines() if line.startswith(MARK)]
        numbers = results[-1] if results else {}
        status = "ok" if rc == 0 and numbers else ("timed out" if rc in (124, 137) else f"FAILED (exit {rc})")
        if status != "ok":
            failed.append(name)
        payload["sections"][name] = {"status": status, "exit_code": rc, "seconds": seconds, **numbers}
        peak = numbers.get("peak_gib")
        rows.append(f"| {name} | {status} | {seconds:.0f} | {'-' if peak is None else f'{peak:.2f}'} |")
    payload.update(commit=git("rev-parse", "HEAD") or None, uncommitted_changes=bool(git("status", "--porcelain")),
                   command=os.environ.get("GPU_CHECK_COMMAND", "bash bench/gpu_check.sh"), machine=gpu_info(),
                   failed=failed)
    m = payload["machine"]
    lines = [f"## GPU check ({m['gpu']}, torch {m['torch']}, CUDA {m['cuda']})", "",
             f"`{payload['command']}` at commit {str(payload['commit'])[:10]}"
             f"{' (with uncommitted changes)' if payload['uncommitted_changes'] else ''}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| section | status | wall s | peak GPU memory (GiB, max_memory_allocated) |", "|---|---|---|---|", *rows,
             "", f"Failed: {', '.join(failed) if failed else 'none'}.", ""]
    for name, section in payload["sections"].items():
        shown = {k: v for k, v in section.items() if k not in ("section", "status", "exit_code", "seconds")}
        lines += [f"### {name}", "", "```", json.dumps(shown, indent=1, default=str), "```", "",
                  "Last lines it printed:", "", "```",
                  *(logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:], "```", ""]
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text("\n".join(lines), encoding="utf-8")
    result.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    print("\n".join(lines[:8 + len(rows)]))
    print(f"wrote {result} and {result.with_suffix('.json').name}")
    return len(failed)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in (*SECTIONS, "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "summary":
        return 1 if summary(Path(rest[0]), Path(rest[1])) else 0
    if name == "pytest":
        section_pytest()
        return 0
    out, overrides = Path(rest[0]), rest[1:]
    {"recipe": section_recipe, "fsdp": section_fsdp, "megatron": section_megatron}[name](out, overrides)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
