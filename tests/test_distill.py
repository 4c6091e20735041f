"""Distillation tier: the losses, the schedule and sample order, then tiny end-to-end runs of `python -m llmprune`:
final/ with its model card and curves, the Hub upload (to a local stand-in endpoint: tests never contact the real
Hub), exact resume after SIGKILL, torchrun with 2 CPU processes (gloo) against 1, and teacher correction.

The end-to-end tests share one uninterrupted reference run (`reference`, about 15 s). Every process runs on one
thread: these models are so small that a second thread only adds contention on a shared machine.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_batch, tiny_model, tiny_run_overrides, tiny_ssm_model
from helpers import plan_for
from hub_standin import HubStandin
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmprune
from llmprune import ConfigError, PruningPlan
from llmprune.adapters import get_adapter
from llmprune.config import DistillConfig
from llmprune.data import to_batches
from llmprune.distill import losses
from llmprune.distill.train import SampleOrder, Student, batch_split, distill_loss, lr_factor
from llmprune.evaluate import evaluate
from llmprune.pruning.map import residual_scale
from llmprune.stages.distillation import hidden_student

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2_minitron"
STEPS, EVAL_EVERY, SEQ, GLOBAL_BATCH = 40, 10, 32, 4
# every loss in the mix, through the learned projection (hidden 48 -> 24), after removing one of 4 layers
DISTILL = {
    "prune.export_config.hidden_size": 24, "prune.export_config.ffn_hidden_size": 32,
    "prune.export_config.num_layers": 3, "prune.depth.num_samples": 4,
    "distill.max_steps": STEPS, "distill.micro_batch_size": 2, "distill.global_batch_size": GLOBAL_BATCH,
    "distill.lr": 1e-3, "distill.warmup_steps": 4, "distill.eval_every": EVAL_EVERY, "distill.save_every": 3,
    "distill.precision": "fp32", "distill.kl_weight": 1.0, "distill.reverse_kl_weight": 0.5, "distill.topk": 16,
    "distill.topk_weight": 0.5, "distill.hidden_weight": 0.1, "distill.lm_weight": 0.001,
    "export.max_shard_size": "50KB",
}
WEIGHTS = {"kl": 1.0, "reverse_kl": 0.5, "topk_kl": 0.5, "hidden": 0.1, "lm": 0.001}
# torchrun against one process: same global batch, fp32. DDP averages the same per-sample gradients the single
# process accumulates, so the trajectories differ only by float summation order (observed: 0 for the training
# losses, ~1e-7 for the held-out metrics, whose token sums are all-reduced).
DDP_RTOL = 1e-4


def overrides(model_dir, out_dir, **changes) -> list[str]:
    settings = {**DISTILL, **changes}
    return tiny_run_overrides(model_dir, out_dir, *(f"{k}={v}" for k, v in settings.items()))


def env(**extra: str) -> dict[str, str]:
    """One thread per process; offline unless a test points HF_ENDPOINT at the stand-in and sets HF_HUB_OFFLINE=0."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **extra}


def llmprune_cli(args: list[str], cwd, environ: dict[str, str], launcher: tuple[str, ...] = ()):
    return subprocess.run([sys.executable, *launcher, "-m", "llmprune", f"recipe={RECIPE}", *args], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=420)


def metrics(run_dir, name: str = "distill") -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / f"{name}_metrics.jsonl").read_text().splitlines()]


def weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors export."""
    out = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def hidden_files(root) -> list[str]:
    """Leftovers of atomic writes (.name.tmp, .final.tmp-*, .step_*.tmp)."""
    return sorted(str(p) for p in Path(root).rglob(".*"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- losses ---------------------------------------------------------------------------------------------------------
def logits(seed: int, shape=(2, 5, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def manual_kl(p_logits, q_logits, valid) -> torch.Tensor:
    """KL(p || q) per token from the definition, token-mean over `valid`."""
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    return (per_token * valid).sum() / valid.sum()


VALID = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # the padded tail of the first row must not count


def test_kl_losses_are_zero_for_identical_logits_and_match_the_definition():
    s, t = logits(0), logits(1)
    for kl in (losses.forward_kl, losses.reverse_kl):
        assert float(kl(t, t, VALID)) == pytest.approx(0.0, abs=1e-6)
        assert float(kl(s, t, VALID)) > 0
    torch.testing.assert_close(losses.forward_kl(s, t, VALID), manual_kl(t, s, VALID))
    torch.testing.assert_close(losses.reverse_kl(s, t, VALID), manual_kl(s, t, VALID))
    # padding changes nothing: garbage on masked positions
    noisy = s.clone()
    noisy[0, 3:] = 100.0
    torch.testing.assert_close(losses.forward_kl(noisy, t, VALID), losses.forward_kl(s, t, VALID))


def test_forward_kl_gradient_is_the_definitions():
    """forward_kl is computed as cross entropy minus the teacher's entropy: same gradient as the plain formula."""
    t = logits(9)
    for temperature in (1.0, 2.0):
        fast, plain = logits(10).requires_grad_(True), logits(10).requires_grad_(True)
        losses.forward_kl(fast, t, VALID, temperature).backward()
        (manual_kl(t / temperature, plain / temperature, VALID) * temperature**2).backward()
        torch.testing.assert_close(fast.grad, plain.grad)
        assert float(fast.grad[0, 3:].abs().max()) == 0.0  # padded positions get no gradient


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_softens_both_distributions_and_scales_by_t_squared(temperature):
    s, t = logits(2), logits(3)
    for kl, manual in ((losses.forward_kl, manual_kl(t / temperature, s / temperature, VALID)),
                       (losses.reverse_kl, manual_kl(s / temperature, t / temperature, VALID))):
        torch.testing.assert_close(kl(s, t, VALID, temperature), manual * temperature**2)


def test_topk_kl_over_the_whole_vocabulary_is_forward_kl_and_otherwise_renormalizes():
    s, t = logits(4), logits(5)
    vocab = s.shape[-1]
    torch.testing.assert_close(losses.topk_kl(s, t, VALID, vocab, 2.0), losses.forward_kl(s, t, VALID, 2.0))
    top = t.topk(3, dim=-1).indices
    expected = manual_kl(t.gather(-1, top), s.gather(-1, top), VALID)
    torch.testing.assert_close(losses.topk_kl(s, t, VALID, 3), expected)
    assert float(losses.topk_kl(t, t, VALID, 3)) == pytest.approx(0.0, abs=1e-6)


def test_lm_loss_is_cross_entropy_over_real_tokens():
    s = logits(6)
    labels = torch.randint(0, s.shape[-1], s.shape[:2], generator=torch.Generator().manual_seed(7))
    every = torch.ones_like(VALID)
    torch.testing.assert_close(losses.lm_loss(s, labels, every), F.cross_entropy(s.flatten(0, 1), labels.flatten()))
    keep = VALID.bool()
    torch.testing.assert_close(losses.lm_loss(s, labels, VALID), F.cross_entropy(s[keep], labels[keep]))


def test_hidden_state_loss_cosine_and_mse():
    g = torch.Generator().manual_seed(8)
    t = [torch.randn(2, 5, 6, generator=g) for _ in range(2)]
    every = torch.ones(2, 5)
    assert float(losses.hidden_state_loss(t, t, None, every)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.hidden_state_loss([-x for x in t], t, None, every)) == pytest.approx(2.0, abs=1e-6)
    assert float(losses.hidden_state_loss([3 * x for x in t], t, None, every)) == pytest.approx(0.0, abs=1e-6)
    s = [torch.randn(2, 5, 6, generator=g) for _ in range(2)]
    expected = torch.stack([((a - b) ** 2).mean() for a, b in zip(s, t)]).mean()
    torch.testing.assert_close(losses.hidden_state_loss(s, t, None, every, "mse"), expected)
    cosine = torch.stack([(1 - F.cosine_similarity(a, b, dim=-1)).mean() for a, b in zip(s, t)]).mean()
    torch.testing.assert_close(losses.hidden_state_loss(s, t, None, every), cosine)
    # through a projection: the student (width 4) is mapped to the teacher's width 6
    narrow = [x[..., :4] for x in s]
    projection = torch.nn.Linear(4, 6, bias=False)
    projected = [projection(x) for x in narrow]
    torch.testing.assert_close(losses.hidden_state_loss(narrow, t, projection, every, "mse"),
                               losses.hidden_state_loss(projected, t, None, every, "mse"))


def layer_models(family: str):
    return tiny_model(family) if family in ("llama", "qwen3") else tiny_ssm_model(family)


@pytest.mark.parametrize("chunked", [False, True], ids=["full_logits", "chunked"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "mamba2", "nemotron_h"])
def test_hidden_loss_pairs_layer_outputs_when_the_teachers_last_layer_is_removed(family, chunked):
    """Removing the teacher's last layer leaves student layers 0 .. n-2 the very computations of the teacher's: every
    pair, the last included, must then compare equal states. transformers returns its last hidden state after the
    final norm (and Mamba2 numbers its hidden states from the first layer's output), so pairing `hidden_states`
    entries compared the student's normed last state with the teacher's un-normed one."""
    teacher = layer_models(family)
    adapter = get_adapter(copy.deepcopy(teacher))
    n = adapter.dims()["num_layers"]
    plan = plan_for(adapter, {}, {}, drop_layers=[n - 1])
    student = adapter.apply(plan).train()
    assert plan.kept_layers == list(range(n - 1))
    ids = tiny_batch(2, 16)
    with torch.no_grad():  # the premise: transformers' last hidden state is normed, a layer's output is not
        hidden = teacher.base_model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        assert hidden[-1] is not None and len(hidden) == n + 1
    for kind in ("mse", "cosine"):
        cfg = SimpleNamespace(**{**vars(DistillConfig()), "kl_weight": 1.0, "hidden_weight": 1.0, "hidden_loss": kind})
        module = Student(student, None, tuple(range(n - 1)))
        loss, parts = distill_loss(teacher, cfg, tuple(plan.kept_layers), chunked)(module, ids)
        # the same float operations on the same inputs: MSE exactly 0; 1 - cos within its own rounding
        assert float(parts["hidden"]) == pytest.approx(0.0, abs=0 if kind == "mse" else 1e-6), (kind, parts["hidden"])
        assert float(parts["kl"]) > 1e-4  # the student does differ from the teacher at its output
        loss.backward()  # the states carry the student's graph
    # and a pair of different layers is not zero: student layer 0 against teacher layer 1
    cfg = SimpleNamespace(**{**vars(DistillConfig()), "hidden_weight": 1.0, "hidden_loss": "mse"})
    _, parts = distill_loss(teacher, cfg, (1,), chunked)(Student(student, None, (0,)), ids)
    assert float(parts["hidden"]) > 1e-6, float(parts["hidden"])


def test_hidden_loss_starts_at_zero_for_zeroed_hidden_channels_pruned():
    """Hidden channels that carried nothing removed, and the teacher's last layer: with rescaled norms the student
    computes exactly what the teacher did in its kept layers (on a residual stream scaled by c), and the projection
    the distill stage builds (`hidden_student`: kept channels back in place, divided by c) maps its layer outputs
    onto the teacher's. Plain slices change what each hidden norm averages over (36 channels, not 48)."""
    teacher = tiny_model("llama", rms_norm_eps=1e-3)
    removed = list(range(0, 48, 4))
    with torch.no_grad():  # the residual stream carries nothing on `removed`
        teacher.model.embed_tokens.weight[:, removed] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[removed] = 0
            layer.mlp.down_proj.weight[removed] = 0
    scores = {"hidden": torch.ones(48)}
    scores["hidden"][removed] = 0
    cfg = SimpleNamespace(**{**vars(DistillConfig()), "hidden_weight": 1.0, "hidden_loss": "mse"})
    ids = tiny_batch(2, 16)
    hidden = {}
    for rescale in (False, True):
        adapter = get_adapter(copy.deepcopy(teacher))
        plan = plan_for(adapter, scores, {"hidden_size": 36}, drop_layers=[3], rescale_norms=rescale)
        assert (residual_scale(plan) == 1.0) != rescale
        module = hidden_student(adapter.apply(plan).train(), plan, (0, 1, 2))
        hidden[rescale] = float(distill_loss(teacher, cfg, (0, 1, 2))(module, ids)[1]["hidden"])
    assert hidden[True] < 1e-14 and hidden[False] > 1e4 * hidden[True], hidden


def test_hidden_loss_without_layer_pairs_is_a_config_error():
    cfg = SimpleNamespace(**{**vars(DistillConfig()), "hidden_weight": 0.5})
    with pytest.raises(ConfigError, match="distill.hidden_weight=0.5 needs pairs"):
        distill_loss(tiny_model("llama"), cfg, ())


def test_channel_projection_puts_each_kept_channel_back_in_its_place():
    kept = [0, 2, 3, 7, 9]
    projection = losses.channel_projection(len(kept), 10, kept)
    teacher = torch.randn(3, 10)
    expected = torch.zeros(3, 10)
    expected[:, kept] = teacher[:, kept]
    assert torch.equal(projection(teacher[:, kept]), expected)
    assert projection.weight.requires_grad  # learned during distillation
    identity = losses.channel_projection(6, 6, None)
    assert torch.equal(identity.weight, torch.eye(6))


# -- chunked logit losses: the step never holds (B, S-1, V) logits ------------------------------------------------
EVERY_LOSS = {"kl_weight": 1.0, "reverse_kl_weight": 0.5, "topk": 16, "topk_weight": 0.5, "lm_weight": 0.1,
              "hidden_weight": 0.1, "temperature": 2.0}
ROW = 4 * 128  # bytes of one position's float32 logits over the tiny vocabulary
BUDGETS = (10 * ROW, 3 * ROW)  # 45 positions: matmuls over 10, 10, 10, 10, 5 rows; losses over 3, 3, 3, 1 / 3, 2


def distill_step(tie: bool, chunked: bool, autocast: torch.dtype | None = None, settings=EVERY_LOSS):
    """(loss, parts, {name: grad}, lm_head calls) of one distill_loss forward + backward on tiny llamas."""
    teacher = tiny_model("llama", tie_word_embeddings=tie).requires_grad_(False)
    student = tiny_model("llama", seed=1, hidden_size=24, intermediate_size=40, tie_word_embeddings=tie).train()
    layers = (0, 2) if settings.get("hidden_weight") else ()
    module = Student(student, losses.channel_projection(24, 48, list(range(0, 48, 2))) if layers else None, layers)
    calls = []
    for model in (teacher, student):
        model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    cfg = SimpleNamespace(**{**vars(DistillConfig()), **settings})
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss, parts = distill_loss(teacher, cfg, layers, chunked, BUDGETS)(module, tiny_batch(3, 16))
    loss.backward()
    return loss.detach(), parts, {n: p.grad for n, p in module.named_parameters()}, len(calls)


@pytest.mark.parametrize("tie", [False, True], ids=["separate_head", "tied_head"])
def test_chunked_logit_losses_equal_the_full_logits_in_value_and_gradient(tie):
    """Chunked (the default): both output layers run on 10 positions at a time, the losses and their gradient on 3,
    so neither model's full logits exist; every loss part and every gradient equals the computation on full logits
    up to float32 rounding."""
    loss, parts, grads, full_calls = distill_step(tie, chunked=False)
    c_loss, c_parts, c_grads, chunked_calls = distill_step(tie, chunked=True)
    assert (full_calls, chunked_calls) == (2, 0)  # the chunked path never calls lm_head on the whole sequence
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
    assert c_parts.keys() == parts.keys() == {"kl", "reverse_kl", "topk_kl", "lm", "hidden"}, c_parts.keys()
    for name in parts:
        torch.testing.assert_close(c_parts[name], parts[name], rtol=1e-6, atol=1e-7, msg=name)
    assert c_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and c_grads[name] is not None, name
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_logit_losses_under_bf16_autocast_stay_within_bf16_rounding():
    """Under bf16 autocast both paths compute the same bf16 logits; the chunked weight gradient sums per-chunk bf16
    products in float32 instead of rounding one product, so gradients agree to bf16 precision."""
    loss, parts, grads, _ = distill_step(False, chunked=False, autocast=torch.bfloat16, settings={})
    c_loss, c_parts, c_grads, _ = distill_step(False, chunked=True, autocast=torch.bfloat16, settings={})
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        relative = float((c_grads[name] - grad).norm() / grad.norm())
        assert relative < 1e-2, (name, relative)


def test_chunked_head_loss_with_a_bias_and_without_gradients():
    """An output layer with a bias (GPT-J): value and the gradients of input, weight and bias equal plain autograd's;
    under no_grad the chunks only add up the loss."""
    g = torch.Generator().manual_seed(11)
    head = torch.nn.Linear(6, 13)
    hidden = torch.randn(14, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (14,), generator=g)

    def chunk_loss(chunk_logits, no_teacher, rows):
        assert no_teacher is None
        loss = F.cross_entropy(chunk_logits, labels[rows], reduction="sum") / len(labels)
        return loss, {"lm": loss}

    plain = F.cross_entropy(head(hidden), labels)
    expected = torch.autograd.grad(plain, (hidden, head.weight, head.bias))
    budgets = (5 * 4 * 13, 2 * 4 * 13)  # 14 rows: matmuls over 5, 5, 4; losses over 2, 2, 1 / 2, 2, 1 / 2, 2
    loss, parts = losses.chunked_head_loss(hidden, head, chunk_loss, budgets=budgets)
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(parts["lm"], plain)
    for got, want in zip(torch.autograd.grad(loss, (hidden, head.weight, head.bias)), expected):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        loss, parts = losses.chunked_head_loss(hidden, head, chunk_loss, budgets=budgets)
    torch.testing.assert_close(loss, plain.detach())
    assert losses.head_chunks(14, 13, 3 * 4 * 13) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12),
                                                       slice(12, 14)]


def test_evaluate_by_output_layer_chunks_equals_whole_logits(monkeypatch):
    """Held-out loss and KL computed from the output layer chunk by chunk (no (B, S-1, V) logits), directly or inside
    the distillation's Student, equal the whole-logits computation (padding included), whose per-token losses run in
    chunks of positions of any size."""
    from llmprune import evaluate as evaluation
    from llmprune.data import Batch

    teacher, student = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = tiny_batch(4, 16)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    batches = [Batch(ids[:2], mask[:2]), Batch(ids[2:])]
    chunked = evaluate(student, batches, teacher=teacher)
    inside = evaluate(Student(student), batches, teacher=teacher)
    monkeypatch.setattr(evaluation, "output_head", lambda model: None)  # every model runs whole
    whole = evaluate(student, batches, teacher=teacher, chunk_bytes=2**30)
    rows = evaluate(student, batches, teacher=teacher, chunk_bytes=5 * ROW)
    assert chunked["tokens"] == whole["tokens"] == 60 - 5
    for result in (chunked, inside, rows):
        for key in ("loss", "kl_to_teacher"):
            assert result[key] == pytest.approx(whole[key], rel=1e-6), key
    assert whole["kl_to_teacher"] > 0.01


def test_evaluate_by_output_layer_in_the_heads_dtype(monkeypatch):
    """Mamba2 keeps its residual stream in float32 under bfloat16 weights and casts it for the output layer; the
    chunked evaluation does the same and scores what the model's own forward scores."""
    from llmprune import evaluate as evaluation

    model = tiny_ssm_model("mamba2").to(torch.bfloat16)
    batches = to_batches(tiny_batch(2, 16), 2)
    chunked = evaluate(model, batches, teacher=model)
    monkeypatch.setattr(evaluation, "output_head", lambda model: None)
    whole = evaluate(model, batches, teacher=model)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6) and chunked["kl_to_teacher"] < 1e-6


# -- schedule, accumulation, sample order ---------------------------------------------------------------------------
def test_lr_factor_warmup_then_cosine_to_the_floor():
    warmup, steps, floor = 4, 14, 0.1
    assert [lr_factor(s, warmup, steps, floor) for s in range(warmup)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(warmup, warmup, steps, floor) == 1.0
    assert lr_factor(warmup + 5, warmup, steps, floor) == pytest.approx(floor + (1 - floor) * 0.5)  # half way
    assert lr_factor(steps, warmup, steps, floor) == pytest.approx(floor)
    assert lr_factor(steps + 10, warmup, steps, floor) == pytest.approx(floor)  # clamped past the end
    decay = [lr_factor(s, warmup, steps, floor) for s in range(warmup, steps + 1)]
    assert decay == sorted(decay, reverse=True), decay
    assert lr_factor(0, 0, 10, 0.0) == 1.0  # no warmup


def test_batch_split_keeps_the_global_batch_and_derives_a_micro_batch_that_divides_it():
    assert batch_split(32, 4, 1) == (4, 8)
    assert batch_split(32, 4, 2) == (4, 4)
    assert batch_split(4, 2, 2) == (2, 1)
    assert batch_split(4, 4, 2) == (2, 1)  # the default recipe under 2-process torchrun
    assert batch_split(6, 4, 1) == (3, 2)
    assert batch_split(12, 8, 2) == (6, 1)
    with pytest.raises(ConfigError, match=r"distill.global_batch_size=6 cannot be split evenly over 4 processes; "
                                          r"choose a multiple of 4, e.g. 8"):
        batch_split(6, 2, 4)


def test_sample_order_is_a_seeded_permutation_per_epoch():
    n = 10
    order = SampleOrder(n, seed=3)
    epochs = [[order(e * n + i) for i in range(n)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n)), epoch
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2], epochs  # reshuffled each epoch
    again = SampleOrder(n, seed=3)
    assert [again(g) for g in reversed(range(3 * n))] == [g for e in reversed(epochs) for g in reversed(e)]
    assert [SampleOrder(n, seed=4)(i) for i in range(n)] != epochs[0]


# -- the reference run: python -m llmprune with distillation, pushed to the stand-in Hub -----------------------------
@pytest.fixture(scope="module")
def reference(tiny_model_dirs, tmp_path_factory):
    """One uninterrupted CLI run (40 steps) that also pushes final/ to a local stand-in Hub."""
    root = tmp_path_factory.mktemp("distill_reference")
    out = root / "run"
    with HubStandin() as hub:
        push = ["export.push_to_hub=true", "export.repo_id=me/tiny", f"export.hub_endpoint={hub.url}"]
        started = time.perf_counter()
        result = llmprune_cli([*overrides(tiny_model_dirs["llama"], out), *push], root,
                              env(HF_TOKEN="dummy", HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url))
        seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"\nreference run: {seconds:.1f} s")
    return SimpleNamespace(out=out, hub=hub, stderr=result.stderr, model_dir=tiny_model_dirs["llama"],
                           report=json.loads((out / "report.json").read_text()))


def test_distilled_run_writes_final_metrics_curves_and_report(reference):
    out, report = reference.out, reference.report
    final = out / "final"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "pruning_plan.json", "model.safetensors.index.json"):
        assert (final / name).is_file(), f"final/{name} missing: {sorted(p.name for p in final.iterdir())}"
    shards = sorted(p.name for p in final.glob("model-*.safetensors"))
    assert len(shards) >= 2, f"export.max_shard_size=50KB should shard the ~120KB model: {shards}"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(weights(final))
    assert (final / "pruning_plan.json").read_text() == (out / "plan.json").read_text()
    assert hidden_files(out) == []

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "eval_kl" in r] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for row in rows:  # the logged total is the configured mix of the logged parts
        mix = sum(w * row[part] for part, w in WEIGHTS.items())
        assert row["loss"] == pytest.approx(mix, rel=1e-5), row
        assert row["tokens"] == row["step"] * GLOBAL_BATCH * SEQ
    assert rows[0]["lr"] == pytest.approx(1e-3 * lr_factor(0, 4, STEPS, 0.1))  # the rate step 1 used
    assert rows[-1]["lr"] == pytest.approx(1e-3 * lr_factor(STEPS - 1, 4, STEPS, 0.1))

    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", png[:16]
    width, height = struct.unpack(">II", png[16:24])
    assert width > height > 100, (width, height)

    final_eval = report["eval"]["final"]
    assert final_eval == {"perplexity": rows[-1]["eval_perplexity"], "kl_to_teacher": rows[-1]["eval_kl"]}
    distill = report["distill"]
    assert (distill["steps"], distill["tokens"]) == (STEPS, STEPS * GLOBAL_BATCH * SEQ), distill
    assert distill["losses"] == {"kl_weight": 1.0, "reverse_kl_weight": 0.5, "topk_weight": 0.5, "hidden_weight": 0.1,
                                 "lm_weight": 0.001}, distill["losses"]
    assert distill["curves"] == "curves.png" and distill["metrics"] == "distill_metrics.jsonl"
    assert report["export_check"]["final"]["max_abs_logit_diff"] == 0.0, report["export_check"]
    md = (out / "report.md").read_text()
    assert "distilled" in md and "curves.png" in md and "Export check (final/)" in md, md


def test_model_card_names_teacher_recipe_plan_budget_and_eval(reference):
    card = (reference.out / "final" / "README.md").read_text()
    report, ev = reference.report, reference.report["eval"]
    tokens = STEPS * GLOBAL_BATCH * SEQ
    for needle in (f"Teacher: {report['model']}", f"recipe `{RECIPE}`", "pruning_plan.json",
                   f"Distillation token budget: {tokens:,}", "pruned and distilled", "library_name: transformers",
                   f"{ev['pruned']['kl_to_teacher']:,.4f}", f"{ev['final']['kl_to_teacher']:,.4f}",
                   f"{ev['teacher']['perplexity']:,.2f}", f"{ev['final']['perplexity']:,.2f}", "Removed layers"):
        assert needle in card, f"{needle!r} not in the model card:\n{card}"


def test_stock_transformers_reloads_final_with_the_trained_weights(reference):
    """final/ holds exactly the last checkpoint's student: same tensors, identical logits (max diff 0)."""
    out = reference.out
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    c = reloaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (24, 32, 3), c

    checkpoint = out / "distill_ckpt" / (out / "distill_ckpt" / "latest").read_text().strip()
    assert json.loads((checkpoint / "state.json").read_text())["step"] == STEPS
    student_state = {k.removeprefix("model."): v for k, v in load_file(str(checkpoint / "model.safetensors")).items()
                     if k.startswith("model.")}  # the Student wrapper also holds `projection.weight`
    student = AutoModelForCausalLM.from_pretrained(out / "pruned").eval()
    student.load_state_dict(student_state, strict=True)
    exported, pruned = weights(out / "final"), weights(out / "pruned")
    assert exported.keys() == student_state.keys() == pruned.keys()
    assert [k for k in exported if not torch.equal(exported[k], student_state[k])] == []
    assert [k for k in exported if torch.equal(exported[k], pruned[k])] == [], "distillation left tensors untouched"

    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - student(input_ids=ids).logits).abs().max()
    assert float(diff) == reference.report["export_check"]["final"]["max_abs_logit_diff"] == 0.0


def test_distillation_reduces_kl_to_the_teacher(reference):
    ev = reference.report["eval"]
    pruned, final = ev["pruned"]["kl_to_teacher"], ev["final"]["kl_to_teacher"]
    assert final < 0.8 * pruned, f"held-out KL to the teacher: pruned {pruned:.5f} -> distilled {final:.5f}"
    evals = [r["eval_kl"] for r in metrics(reference.out) if "eval_kl" in r]
    assert evals[-1] < evals[0], evals


# -- Hub upload --------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_every_file_of_final_byte_identical(reference):
    hub, final = reference.hub, reference.out / "final"
    local = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    uploaded = hub.repos["me/tiny"]
    assert sorted(uploaded) == sorted(local)
    assert [name for name in local if uploaded[name] != local[name]] == []
    assert any(name.endswith(".safetensors") for name in uploaded)
    assert hub.unhandled == [], f"the client called endpoints the stand-in lacks: {hub.unhandled}"
    assert hub.authorization == {"Bearer dummy"}  # HF_TOKEN, and nothing else
    assert [c["visibility"] for c in hub.created] == ["private"]  # export.private defaults to true
    assert {c["summary"] for c in hub.commits} == {f"llmprune {RECIPE}"}
    pushed = reference.report["hub"]
    assert pushed["repo_id"] == "me/tiny" and pushed["url"] == f"{hub.url}/me/tiny", pushed
    assert pushed["commit"] == hub.commits[-1]["oid"], (pushed, hub.commits)
    assert f"Pushed to {hub.url}/me/tiny" in (reference.out / "report.md").read_text()


# -- exact resume ---------------------------------------------------------------------------------------------------
def test_sigkilled_run_resumes_to_the_same_weights_as_an_uninterrupted_one(reference, tmp_path):
    out = tmp_path / "killed"
    args = overrides(reference.model_dir, out)
    command = [sys.executable, "-m", "llmprune", f"recipe={RECIPE}", *args]
    latest = out / "distill_ckpt" / "latest"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            while not latest.exists():
                assert proc.poll() is None, (f"exited {proc.returncode} before its first checkpoint:\n"
                                             f"{(tmp_path / 'killed.log').read_text()[-3000:]}")
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    killed_at = latest.read_text()
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    assert not (out / "final").exists() and int(killed_at.removeprefix("step_")) < STEPS, \
        f"the run finished before it was killed ({killed_at}): nothing would be resumed"

    with (out / "distill_metrics.jsonl").open("a") as f:  # as a kill in the middle of an append leaves it
        f.write('{"step": 99, "lo')
    resumed = llmprune_cli(args, tmp_path, env())
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "distill: resuming from" in resumed.stderr, resumed.stderr[-4000:]
    assert "dropping a torn last line" in resumed.stderr
    expected, got = weights(reference.out / "final"), weights(out / "final")
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert different == [], f"killed at {killed_at}: {len(different)} tensors differ, e.g. {different[:3]}"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(reference.out)), f"killed at {killed_at}"
    assert hidden_files(out) == []


def test_checkpoint_of_other_settings_is_set_aside_not_resumed(reference, tmp_path):
    """Another distill config in the same output_dir (e.g. re-targeting) starts over; the old run is kept aside."""
    out = tmp_path / "copy"
    shutil.copytree(reference.out, out)
    old_latest = (out / "distill_ckpt" / "latest").read_text()
    report = llmprune.run(RECIPE, overrides(reference.model_dir, out, **{"distill.lr": 5e-4}))
    assert (out / "distill_ckpt.previous" / "latest").read_text() == old_latest
    assert len(metrics(out)) == STEPS and metrics(out)[0]["lr"] != metrics(reference.out)[0]["lr"]
    assert (out / "distill_metrics.previous.jsonl").read_text() == (reference.out / "distill_metrics.jsonl").read_text()
    assert report["distill"]["steps"] == STEPS


# -- torchrun -------------------------------------------------------------------------------------------------------
def same_trajectory(one: list[dict], other: list[dict], label: str) -> float:
    """Assert every logged value of every step agrees within DDP_RTOL; returns the worst relative difference."""
    worst = 0.0
    for a, b in zip(one, other, strict=True):
        assert a.keys() == b.keys(), (a, b)
        for key in sorted(set(a) - {"seconds"}):
            rel = abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
            assert rel <= DDP_RTOL, f"step {a['step']} {key}: 1 process {a[key]!r}, {label} {b[key]!r}"
            worst = max(worst, rel)
    return worst


def test_torchrun_two_processes_match_one(reference, tmp_path):
    """2 CPU processes (gloo, micro batch 2 each) against the 1-process reference (micro batch 2, 2 accumulation
    steps): the same plan, and the same trajectory within DDP_RTOL."""
    out = tmp_path / "ddp"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = llmprune_cli(overrides(reference.model_dir, out), tmp_path, env(), launcher)
    assert result.returncode == 0, result.stderr[-4000:]

    plan_1, plan_2 = (PruningPlan.from_json((d / "plan.json").read_text()) for d in (reference.out, out))
    assert plan_2.fingerprint() == plan_1.fingerprint()
    assert (plan_2.kept_layers, plan_2.hidden, plan_2.ffn) == (plan_1.kept_layers, plan_1.hidden, plan_1.ffn)

    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1)), "rank 0 alone writes the metrics"
    worst = same_trajectory(metrics(reference.out), metrics(out), "2 processes")
    print(f"\ntorchrun vs 1 process: max relative difference {worst:.2e} (tolerance {DDP_RTOL:.0e})")
    w1, w2 = weights(reference.out / "final"), weights(out / "final")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-5

    # one run directory, written by rank 0; logs, progress bars and the merged config once
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.out.iterdir())
    assert hidden_files(out) == []
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["final"]["kl_to_teacher"] == pytest.approx(reference.report["eval"]["final"]["kl_to_teacher"],
                                                                       rel=DDP_RTOL)
    logs = result.stderr.replace("\r", "\n")
    assert logs.count("[llmprune] stage: distill") == 1, logs[-3000:]
    assert logs.count(f"llmprune: recipe {RECIPE}") == 1  # the run header, from rank zero only
    bars = reference.stderr.replace("\r", "\n").count("Loading weights:   0%")
    assert logs.count("Loading weights:   0%") == bars, "transformers' loading bar printed by rank 1 too"
    assert logs.count(f"| 0/{STEPS} [00:00<?, ?it/s]") == 1, "one distillation progress bar"


# -- FSDP2 ----------------------------------------------------------------------------------------------------------
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


@pytest.fixture(scope="module")
def fsdp_run(reference, tmp_path_factory):
    """The reference settings on 2 processes with distill.strategy=fsdp (FSDP2 over gloo, one unit per layer)."""
    root = tmp_path_factory.mktemp("fsdp")
    result = llmprune_cli(overrides(reference.model_dir, root / "run", **{"distill.strategy": "fsdp"}), root, env(),
                          TORCHRUN)
    assert result.returncode == 0, result.stderr[-4000:]
    shards = re.search(r"distill: FSDP2 over 2 processes, 3 layer units \+ the root; this process holds ([\d,]+) of "
                       r"([\d,]+) parameters", result.stderr)
    assert shards, result.stderr[-4000:]
    local, total = (int(g.replace(",", "")) for g in shards.groups())
    assert total / 2 <= local <= total / 2 + 100, (local, total)  # rank 0's half (+ the rounding of odd dims)
    return SimpleNamespace(out=root / "run", root=root, stderr=result.stderr)


def test_fsdp_two_processes_match_one(reference, fsdp_run):
    """FSDP2 shards the student but computes what one process computes: same losses, metrics and final weights."""
    assert [r["step"] for r in metrics(fsdp_run.out)] == list(range(1, STEPS + 1))
    worst = same_trajectory(metrics(reference.out), metrics(fsdp_run.out), "FSDP")
    print(f"\nFSDP vs 1 process: max relative difference {worst:.2e} (tolerance {DDP_RTOL:.0e})")
    w1, w2 = weights(reference.out / "final"), weights(fsdp_run.out / "final")
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-5
    report = json.loads((fsdp_run.out / "report.json").read_text())
    assert report["export_check"]["final"]["max_abs_logit_diff"] == 0.0  # final/ holds the gathered weights
    assert hidden_files(fsdp_run.out) == []


def test_fsdp_run_resumes_exactly_and_its_checkpoint_is_whole(reference, fsdp_run):
    """Resuming the FSDP run from its step-39 checkpoint (sharded model and optimizer restored from whole tensors)
    ends with the uninterrupted run's weights, bit for bit; and one process resumes the same checkpoint."""
    out = fsdp_run.root / "resumed"
    shutil.copytree(fsdp_run.out, out)
    shutil.rmtree(out / "final")
    ckpt = out / "distill_ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_{STEPS - 1:06d}", f"step_{STEPS:06d}"]
    shutil.rmtree(ckpt / f"step_{STEPS:06d}")
    (ckpt / "latest").write_text(f"step_{STEPS - 1:06d}")
    whole = load_file(str(ckpt / f"step_{STEPS - 1:06d}" / "model.safetensors"))  # unsharded, named like 1 process
    assert whole.keys() == load_file(str(reference.out / "distill_ckpt" / f"step_{STEPS:06d}" /
                                         "model.safetensors")).keys()
    assert whole["model.model.embed_tokens.weight"].shape == (128, 24)

    resumed = llmprune_cli(overrides(reference.model_dir, out, **{"distill.strategy": "fsdp"}), fsdp_run.root, env(),
                           TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"distill: resuming from {ckpt / f'step_{STEPS - 1:06d}'}" in resumed.stderr
    expected, got = weights(fsdp_run.out / "final"), weights(out / "final")
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []

    # the same checkpoint under one process (strategy is ignored there): whole tensors load anywhere
    single = fsdp_run.root / "single"
    shutil.copytree(out, single)
    shutil.rmtree(single / "final")
    shutil.rmtree(single / "distill_ckpt" / f"step_{STEPS:06d}")
    (single / "distill_ckpt" / "latest").write_text(f"step_{STEPS - 1:06d}")
    llmprune.run(RECIPE, overrides(reference.model_dir, single, **{"distill.strategy": "fsdp"}))
    got = weights(single / "final")
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-5


def test_fsdp_teacher_correction_matches_one_process(reference, tmp_path):
    """Teacher correction trains a sharded copy of the teacher and puts the weights back before calibration."""
    settings = {"distill.teacher_correction_steps": 4, "distill.teacher_correction_lr": 1e-3,
                "distill.max_steps": 2, "distill.eval_every": 2, "distill.strategy": "fsdp"}
    one = llmprune.run(RECIPE, overrides(reference.model_dir, tmp_path / "one", **settings))
    result = llmprune_cli(overrides(reference.model_dir, tmp_path / "two", **settings), tmp_path, env(), TORCHRUN)
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    for a, b in zip(metrics(tmp_path / "one", "correct"), metrics(tmp_path / "two", "correct"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=DDP_RTOL), (a, b)
    # the corrected teacher (evaluated after correction, before pruning) is the same model on both
    assert two["eval"]["teacher"]["loss"] == pytest.approx(one["eval"]["teacher"]["loss"], rel=DDP_RTOL)
    assert two["eval"]["teacher"]["loss"] != pytest.approx(reference.report["eval"]["teacher"]["loss"], rel=1e-4)
    assert PruningPlan.from_json((tmp_path / "two" / "plan.json").read_text()).fingerprint() == \
        PruningPlan.from_json((tmp_path / "one" / "plan.json").read_text()).fingerprint()


# -- teacher correction -------------------------------------------------------------------------------------------
def correction_text_losses(model_dir, run_dir, settings: dict) -> tuple[float, float]:
    """LM loss of the original and of the corrected teacher (run_dir's last correction checkpoint) on the windows
    teacher correction trains on (the distillation windows of the run's data settings)."""
    from transformers import AutoTokenizer

    from llmprune.distill.checkpoint import latest_checkpoint
    from llmprune.pipeline import load_data

    cfg = llmprune.load_config(RECIPE, overrides(model_dir, run_dir, **settings))
    windows = load_data(cfg.data, AutoTokenizer.from_pretrained(model_dir), cfg.seed).train
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    corrected = copy.deepcopy(original)
    state = load_file(str(latest_checkpoint(Path(run_dir) / "correct_ckpt") / "model.safetensors"))
    missing, unexpected = corrected.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head is not stored
    batches = to_batches(windows, 4)
    return evaluate(original, batches)["loss"], evaluate(corrected, batches)["loss"]


def test_teacher_correction_fine_tunes_the_teacher_first(reference, tmp_path):
    out = tmp_path / "corrected"
    correction = {"distill.teacher_correction_steps": 4, "distill.teacher_correction_lr": 1e-3,
                  "distill.max_steps": 2, "distill.eval_every": 2}
    report = llmprune.run(RECIPE, overrides(reference.model_dir, out, **correction))
    rows = metrics(out, "correct")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(set(r) >= {"lm", "lr", "loss"} for r in rows), rows
    assert rows[0]["lr"] == pytest.approx(1e-3 * lr_factor(0, 4, 4, 0.1))
    assert (out / "correct_ckpt" / "latest").exists() and len(metrics(out)) == 2
    assert list(report["timings_s"])[:4] == ["load", "data", "correct_teacher", "calibrate"]
    # the teacher changed, towards the correction text: its LM loss on the windows it was corrected on went down
    # (the held-out loss, same text as the reference run's, moved as well)
    before, after = reference.report["eval"]["teacher"]["loss"], report["eval"]["teacher"]["loss"]
    assert abs(after - before) > 1e-3, (before, after)
    original, corrected = correction_text_losses(reference.model_dir, out, correction)
    print(f"\nLM loss on the correction windows: original {original:.4f}, corrected {corrected:.4f}")
    assert corrected < original - 0.05, (original, corrected)
    assert math.isfinite(report["eval"]["final"]["kl_to_teacher"])

    # other correction settings: the correction checkpoint of this teacher is not resumed (set aside instead)
    llmprune.run(RECIPE, overrides(reference.model_dir, out, **{**correction, "distill.teacher_correction_lr": 5e-4}))
    assert (out / "correct_ckpt.previous" / "latest").exists()
    assert metrics(out, "correct")[0]["lr"] == pytest.approx(5e-4 * lr_factor(0, 4, 4, 0.1))


def test_metrics_with_a_bad_line_before_the_last_name_the_file(tmp_path):
    from llmprune.distill.train import _read_metrics

    path = tmp_path / "distill_metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ConfigError, match="distill_metrics.jsonl: line 2 is not JSON"):
        _read_metrics(path, 3)
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert _read_metrics(path, 5) == [{"step": 1}, {"step": 2}]


def test_curves_start_both_eval_series_at_the_pruned_model():
    from llmprune.report import eval_series

    history = [{"tokens": 10, "loss": 1.0}, {"tokens": 20, "loss": 0.9, "eval_perplexity": 30.0, "eval_kl": 0.5},
               {"tokens": 30, "loss": 0.8, "eval_perplexity": 25.0, "eval_kl": None}]
    series = eval_series(history, {"perplexity": 200.0, "kl_to_teacher": 2.5})
    assert series["eval_perplexity"] == ([0, 20, 30], [200.0, 30.0, 25.0])
    assert series["eval_kl"] == ([0, 20], [2.5, 0.5])  # a step without KL (teacher cache) is left out
    assert eval_series(history)["eval_kl"] == ([20], [0.5])
