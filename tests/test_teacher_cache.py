"""distill.teacher_cache: top-k KL from the cache equals top-k KL with the live teacher; the build resumes, is
rebuilt when its inputs change, and the pipeline trains with the teacher released."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import tiny_model, tiny_run_overrides
from omegaconf import OmegaConf

import llmprune
import llmprune.pipeline
import llmprune.stages.distillation
from llmprune import ConfigError, load_config
from llmprune.config.schema import DistillConfig
from llmprune.distill import cache as distill_cache
from llmprune.distill.cache import build_teacher_cache, cached_distill_loss, cached_topk_kl, shard_path
from llmprune.distill.losses import topk_kl
from llmprune.distill.train import Student, distill_loss
from llmprune.evaluate import predicting_positions

K = 8


def settings(**overrides):
    base = {"topk": K, "topk_weight": 1.0, "kl_weight": 0.0, "micro_batch_size": 2, "precision": "fp32",
            "temperature": 2.0, "teacher_cache": True}
    return OmegaConf.merge(OmegaConf.structured(DistillConfig), {**base, **overrides})


def random_windows(n: int = 5, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def count_forwards(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_topk_kl_equals_live_teacher_value_and_gradient(tmp_path):
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    windows = random_windows()
    cache = build_teacher_cache(teacher, windows, settings(), tmp_path / "tc", shard_windows=2)
    for batch in ([0, 1], [4, 2]):  # a batch as it was built, and one across shards in another order
        ids = windows[batch]
        keep = predicting_positions(ids)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, logits_to_keep=keep).logits  # (B, S-1, V)
        s = student(input_ids=ids, logits_to_keep=keep).logits.detach().requires_grad_()
        valid = torch.ones(s.shape[:2])
        live = topk_kl(s, t_logits, valid, K, temperature=2.0)
        (live_grad,) = torch.autograd.grad(live, s)
        cached = cached_topk_kl(s, *cache.lookup(ids), valid, temperature=2.0)
        (cached_grad,) = torch.autograd.grad(cached, s)
        if batch == [0, 1]:  # the same teacher forward: bit for bit
            assert torch.equal(live, cached), (live.item(), cached.item())
            assert torch.equal(live_grad, cached_grad), (live_grad - cached_grad).abs().max()
        else:  # another batch composition changes the teacher's matmuls in the last bits only
            torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cached_grad, live_grad, rtol=1e-4, atol=1e-7)
        assert live.item() > 0


def test_chunked_cached_loss_matches_live_distill_loss(tmp_path):
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    cfg = settings(lm_weight=0.5)
    windows = random_windows()
    cache = build_teacher_cache(teacher, windows, cfg, tmp_path / "tc")
    ids = windows[[3, 1]]
    module = Student(student)
    results = []
    for compute in (distill_loss(teacher, cfg, ()), cached_distill_loss(cache, cfg, budgets=(1024, 512))):
        student.zero_grad(set_to_none=True)
        loss, parts = compute(module, ids)
        loss.backward()
        results.append((loss.detach(), parts, [p.grad.clone() for p in student.parameters()]))
    (live, live_parts, live_grads), (cached, cached_parts, cached_grads) = results
    assert set(cached_parts) == set(live_parts) == {"topk_kl", "lm"}, cached_parts
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    for g_cached, g_live in zip(cached_grads, live_grads):
        torch.testing.assert_close(g_cached, g_live, rtol=1e-4, atol=1e-6)


def test_killed_build_resumes_at_the_first_missing_shard(tmp_path, monkeypatch):
    teacher = tiny_model("llama")
    windows = random_windows(n=5)
    cfg, cache_dir = settings(micro_batch_size=1), tmp_path / "tc"
    calls = count_forwards(teacher)
    write = distill_cache._write_shard
    written = []

    def dies_after_two(path, values, indices):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        write(path, values, indices)
        written.append(path)

    monkeypatch.setattr(distill_cache, "_write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(teacher, windows, cfg, cache_dir, shard_windows=1)
    assert calls[0] == 3 and [p.name for p in written] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    finished = {i: shard_path(cache_dir, i).stat().st_mtime_ns for i in range(2)}
    monkeypatch.setattr(distill_cache, "_write_shard", write)

    calls[0] = 0
    cache = build_teacher_cache(teacher, windows, cfg, cache_dir, shard_windows=1)
    assert calls[0] == 3, f"resuming recomputed {calls[0]} windows, expected the 3 missing ones"
    assert cache.summary["computed"] == 3 and cache.summary["reused"] == 2, cache.summary
    assert {i: shard_path(cache_dir, i).stat().st_mtime_ns for i in range(2)} == finished
    assert not sorted(p.name for p in cache_dir.glob(".*")), "a temporary file was left behind"
    fresh = build_teacher_cache(teacher, windows, cfg, tmp_path / "fresh", shard_windows=1)
    assert torch.equal(cache.values, fresh.values) and torch.equal(cache.indices, fresh.indices)


def test_changed_teacher_data_or_k_rebuilds_and_unchanged_reuses(tmp_path, llmprune_log):
    teacher = tiny_model("llama")
    windows, cfg, cache_dir = random_windows(), settings(), tmp_path / "tc"
    calls = count_forwards(teacher)
    first = build_teacher_cache(teacher, windows, cfg, cache_dir, shard_windows=2)
    assert first.summary["computed"] == 3

    calls[0] = 0
    again = build_teacher_cache(teacher, windows, cfg, cache_dir, shard_windows=2)
    assert calls[0] == 0 and again.summary["reused"] == 3, again.summary
    assert torch.equal(again.values, first.values)

    with torch.no_grad():  # a corrected teacher: every weight moves a little
        for p in teacher.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    changed = build_teacher_cache(teacher, windows, cfg, cache_dir, shard_windows=2)
    assert changed.summary["computed"] == 3 and not torch.equal(changed.values, first.values)
    assert any("other teacher" in line for line in llmprune_log), llmprune_log

    other = random_windows(seed=1)
    rebuilt = build_teacher_cache(teacher, other, cfg, cache_dir, shard_windows=2)
    assert rebuilt.summary["computed"] == 3
    assert any("other windows" in line for line in llmprune_log), llmprune_log

    bigger_k = build_teacher_cache(teacher, other, settings(topk=K + 4), cache_dir, shard_windows=2)
    assert bigger_k.summary["computed"] == 3 and bigger_k.values.shape[-1] == K + 4


def test_teacher_cache_config_names_the_conflicting_keys():
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", ["distill.teacher_cache=true", "distill.hidden_weight=1"])
    message = str(err.value)
    for key in ("distill.topk_weight", "distill.kl_weight=1.0", "distill.hidden_weight=1.0"):
        assert key in message, message
    assert "reverse_kl_weight" not in message, message
    load_config("smollm2_minitron", ["distill.teacher_cache=true", "distill.kl_weight=0", "distill.topk_weight=1",
                                     "distill.topk=8"])


def test_pipeline_distils_from_the_cache_with_the_teacher_released(tiny_model_dirs, tmp_path, monkeypatch):
    teachers = []
    load = llmprune.pipeline.load_model

    def load_and_watch(*args, **kwargs):
        model, tokenizer, source = load(*args, **kwargs)
        teachers.append(weakref.ref(model))
        return model, tokenizer, source

    train = llmprune.stages.distillation.train
    alive_at_training = []

    def train_and_check(*args, **kwargs):
        gc.collect()
        alive_at_training.append(teachers[0]() is not None)
        return train(*args, **kwargs)

    monkeypatch.setattr(llmprune.pipeline, "load_model", load_and_watch)
    monkeypatch.setattr(llmprune.stages.distillation, "train", train_and_check)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], out, "prune.export_config.hidden_size=40",
                                   "prune.export_config.ffn_hidden_size=48", "prune.depth.num_samples=2",
                                   "distill.teacher_cache=true", "distill.kl_weight=0", "distill.topk_weight=1",
                                   f"distill.topk={K}")
    report = llmprune.run("smollm2_minitron", overrides)

    assert alive_at_training == [False], "the teacher model is still referenced when training starts"
    summary = report["distill"]["teacher_cache"]
    assert summary["shards"] >= 1 and summary["bytes"] > 0 and summary["topk"] == K, summary
    assert 1 <= summary["windows"] <= 2 * 2, "only the windows of distill.max_steps x global_batch_size are cached"
    assert (out / "teacher_cache" / "manifest.json").is_file() and shard_path(out / "teacher_cache", 0).is_file()
    assert "teacher_cache" in report["timings_s"]
    assert report["distill"]["steps"] == 2 and report["eval"]["final"]["kl_to_teacher"] is None
    assert report["eval"]["final"]["perplexity"] > 1
    assert (out / "final" / "config.json").is_file()
