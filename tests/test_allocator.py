"""The allocator `python -m llmprune` runs with (llmprune.allocator): jemalloc preloaded where installed, and training's
keep / release of freed memory under it. CI installs libjemalloc2 (scripts/install.sh test)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llmprune.allocator import find_jemalloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that first calls use_jemalloc(), as `python -m llmprune` does."""
    program = "from llmprune.allocator import use_jemalloc\nuse_jemalloc()\n" + textwrap.dedent(code)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLMPRUNE_") and k != "LD_PRELOAD"}
    return subprocess.run([sys.executable, "-c", program], env={**environ, **env}, capture_output=True, text=True,
                          timeout=120)


def test_jemalloc_is_installed_where_tests_run():
    assert find_jemalloc() is not None, "scripts/install.sh test installs libjemalloc2"


@pytest.mark.parametrize("choice, loaded", [("auto", True), ("jemalloc", True), ("system", False)])
def test_the_command_runs_again_with_the_chosen_allocator(choice, loaded):
    done = run("""
        import os
        from llmprune.allocator import jemalloc_loaded
        maps = open("/proc/self/maps").read()
        print(jemalloc_loaded(), "libjemalloc" in maps, os.getpid())
    """, LLMPRUNE_ALLOCATOR=choice)
    assert done.returncode == 0, done.stderr
    flag, mapped, _ = done.stdout.split()
    assert (flag, mapped) == (str(loaded), str(loaded))


def test_a_missing_library_is_an_error_only_when_required():
    done = run("print('ran')", LLMPRUNE_ALLOCATOR="jemalloc", LLMPRUNE_JEMALLOC="/nonexistent/libjemalloc.so.2")
    assert done.returncode != 0
    assert "LLMPRUNE_JEMALLOC=/nonexistent/libjemalloc.so.2: no such file" in done.stderr
    assert "LLMPRUNE_ALLOCATOR=system" in done.stderr
    done = run("print('ran')", LLMPRUNE_ALLOCATOR="auto", LLMPRUNE_JEMALLOC="/nonexistent/libjemalloc.so.2")
    assert (done.returncode, done.stdout.strip()) == (0, "ran")
    done = run("print('ran')", LLMPRUNE_ALLOCATOR="tcmalloc")
    assert done.returncode != 0 and "LLMPRUNE_ALLOCATOR='tcmalloc'; use one of auto, jemalloc, system" in done.stderr


@pytest.mark.parametrize("choice", ["jemalloc", "system"])
def test_freed_memory_is_kept_during_training_and_given_back_after(choice):
    """keep_freed_memory: 400 MB freed stay resident (the next step reuses them without page faults);
    release_freed_memory: they leave."""
    done = run("""
        import torch
        from llmprune.allocator import keep_freed_memory, release_freed_memory

        def rss_mb():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024

        kept_by = keep_freed_memory()
        print(kept_by)
        base = rss_mb()
        blocks = [torch.ones(2**20) for _ in range(100)]  # 100 x 4 MiB
        del blocks
        kept = rss_mb() - base
        release_freed_memory()
        print(kept, rss_mb() - base)
        if kept_by == "jemalloc":  # the steps' arenas never purge by themselves
            import ctypes
            value, size = ctypes.c_ssize_t(0), ctypes.c_size_t(8)
            ctypes.CDLL(None).mallctl(b"arena.0.dirty_decay_ms", ctypes.byref(value), ctypes.byref(size), None, 0)
            assert value.value == -1, value.value
    """, LLMPRUNE_ALLOCATOR=choice)
    assert done.returncode == 0, done.stderr
    kept_by, sizes = done.stdout.splitlines()
    kept, after = map(int, sizes.split())
    assert kept_by == {"jemalloc": "jemalloc", "system": "glibc"}[choice]
    assert kept > 300, f"{kept} MB of 400 freed stayed resident"
    assert after < 100, f"{after} MB still resident after the release"


def test_training_gives_memory_back_when_backward_reaches_the_embedding(monkeypatch, tmp_path):
    """train() releases the allocator's free memory once per micro-batch where backward has produced every layer's
    gradients and not yet the embedding's (the activations are free, the dense embedding gradient is next), besides
    after each step."""
    from types import SimpleNamespace

    from conftest import tiny_batch, tiny_model

    from llmprune.config import DistillConfig
    from llmprune.distill import train as training

    teacher = tiny_model("llama").requires_grad_(False)
    student = tiny_model("llama", seed=1, hidden_size=24, intermediate_size=40).train()
    embedding = student.get_input_embeddings()
    layers = [p for n, p in student.named_parameters() if ".layers." in n]
    moments = []
    monkeypatch.setattr(training, "release_freed_memory", lambda: moments.append(
        (all(p.grad is not None for p in layers), embedding.weight.grad is None)))
    cfg = SimpleNamespace(**{**vars(DistillConfig()), "max_steps": 3, "micro_batch_size": 2, "global_batch_size": 2,
                             "precision": "fp32", "eval_every": 100, "save_every": 100})
    loss = training.distill_loss(teacher, cfg, ())
    training.train(training.Student(student), tiny_batch(8, 16), loss, cfg, tmp_path, "distill", "fp")
    at_embedding = [m for m in moments if m[0]]
    assert at_embedding == [(True, True)] * cfg.max_steps, moments
    assert len(moments) == 1 + cfg.max_steps + (cfg.max_steps - 1) + 1  # before, at each embedding, between, after
