"""Knowledge distillation of the pruned student from the original teacher (Minitron, arXiv:2407.14679 Sec. 3).

`train()` is one loop for distillation and for teacher correction: AdamW, linear warmup + cosine decay,
gradient accumulation, clipping, bf16 autocast where the hardware has it (CUDA, or CPUs with AMX /
AVX512-BF16), gradient checkpointing, DDP or FSDP2 under torchrun, periodic held-out evaluation, and checkpoints
that resume exactly: the samples of step s are a pure function of (seed, s), and model, optimizer, scheduler and
RNG states are restored, so a killed run continues to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers.utils import ModelOutput

from llmprune.allocator import keep_freed_memory, release_freed_memory
from llmprune.distill import losses
from llmprune.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llmprune.distill.recompute import recompute_products
from llmprune.distributed import (
    all_reduce_sum,
    barrier,
    fully_shard_units,
    is_distributed,
    is_rank_zero,
    rank,
    world_size,
)
from llmprune.errors import ConfigError
from llmprune.evaluate import predicting_positions
from llmprune.progress import log, progress


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AMX or AVX512-BF16), where bf16 autocast is several times faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 | fp32 | auto (bf16 where the hardware has it). None means full float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def batch_split(global_batch: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(micro-batch, micro-batches per optimizer step on each rank) so that every step sees `global_batch` samples.

    The global batch defines the training trajectory; the micro-batch only how much of it is in memory at once. When
    `micro_batch` x `world` does not divide it (a recipe's settings under another process count), the micro-batch
    becomes the largest divisor of the per-rank share below it, and the log says so.
    """
    if global_batch % world:
        raise ConfigError(f"distill.global_batch_size={global_batch} cannot be split evenly over {world} processes; "
                          f"choose a multiple of {world}, e.g. {world * max(1, round(global_batch / world))}.")
    share = global_batch // world
    micro = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    if micro != micro_batch:
        log.info(f"distill: micro-batch {micro} instead of distill.micro_batch_size={micro_batch}, so that {world} "
                 f"process(es) x {micro} x {share // micro} accumulation steps = distill.global_batch_size="
                 f"{global_batch}")
    return micro, share // micro


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))


class SampleOrder:
    """Global sample g -> window index: a fresh seeded permutation of all windows per epoch."""

    def __init__(self, num_windows: int, seed: int):
        self.n, self.seed, self._perms = num_windows, seed, {}

    def __call__(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][pos])


@dataclass
class StudentOutput(ModelOutput):
    """A dict-like output, so DDP and FSDP find the tensors in it."""

    logits: torch.Tensor | None = None
    states: list[torch.Tensor] | None = None
    loss: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] | None = None


def layer_names(model: nn.Module, indices: tuple[int, ...]) -> tuple[str, ...]:
    """The names inside `model` of its decoder layers `indices` (the family's adapter knows which modules they are)."""
    if not indices:
        return ()
    from llmprune.adapters import get_adapter  # adapters import the pruning code, which does not import this module

    names = {id(m): n for n, m in model.named_modules()}
    layers = get_adapter(model).layers
    return tuple(names[id(layers[i])] for i in indices)


@contextmanager
def layer_outputs(model: nn.Module, names: tuple[str, ...]):
    """Collect the outputs of the layers `names` during the forward inside the block: [output of names[k]] in order.

    Hidden-state distillation pairs student layer j with teacher layer kept_layers[j]: each is the residual stream a
    layer hands on, before any final norm. Transformers' `hidden_states` does not say that consistently: the last
    entry is the final norm's output (llama, qwen, Nemotron-H: hidden_states[i + 1] is layer i's output except for
    the last layer; Mamba2: hidden_states[i] is), so a teacher whose last layer was removed would be compared before
    its norm with a student after its norm. The hooks live only for this forward: a gradient-checkpointed layer that
    runs again in backward does not overwrite what was collected (nor keep its recomputed activations alive).
    """
    found: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _args, output):
            found[name] = output[0] if isinstance(output, tuple) else output  # (B, S, H)
        return hook

    handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    states: list[torch.Tensor] = []
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
    states.extend(found[name] for name in names)


class Student(nn.Module):
    """The student plus the learned projection of its hidden states onto the teacher's width.

    Called like a causal LM (`evaluate` takes it as is, which matters under FSDP, where only the root module may
    run): returns `.logits` and `.states`, the projected outputs of its decoder layers `hidden_layers` (each layer's
    output, before the final norm: `layer_outputs`). Given `head_loss`, it returns `.loss` and `.parts` of
    `head_loss(hidden, output layer)` instead of logits, with `hidden` the final norm's outputs at `logits_to_keep`:
    the loss then runs inside the forward of the module DDP and FSDP wrap.
    """

    takes_head_loss = True  # evaluate() hands it the chunked held-out sums as `head_loss`

    def __init__(self, model: nn.Module, projection: nn.Module | None = None, hidden_layers: tuple[int, ...] = ()):
        super().__init__()
        self.model = model
        self.projection = projection
        self.hidden_layers = hidden_layers
        # names, not modules: FSDP trains a deep copy of this module, whose layers the names find as well
        self.layer_names = layer_names(model, hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, head_loss: Callable | None = None, **_):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        with layer_outputs(self.model, self.layer_names) as states:
            if head_loss is None:
                out = self.model(**kwargs, logits_to_keep=logits_to_keep)
            else:
                out = self.model.base_model(**kwargs)
        if self.projection is not None:
            states = [self.projection(s) for s in states]
        if head_loss is None:
            return StudentOutput(logits=out.logits, states=states)
        loss, parts = head_loss(out.last_hidden_state[:, logits_to_keep], losses.output_head(self.model))
        return StudentOutput(states=states, loss=loss, parts=parts)


def logit_loss_parts(cfg) -> dict[str, float]:
    """The configured logit losses and their weights."""
    weights = {"kl": cfg.kl_weight, "reverse_kl": cfg.reverse_kl_weight, "topk_kl": cfg.topk_weight,
               "lm": cfg.lm_weight}
    return {name: w for name, w in weights.items() if w}


def logit_losses(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, cfg) -> dict:
    """{part: (weight, token-mean value)} of the logit losses on student and teacher logits (..., V)."""
    parts = {}
    for name, weight in logit_loss_parts(cfg).items():
        if name == "kl":
            value = losses.forward_kl(s, t, valid, cfg.temperature)
        elif name == "reverse_kl":
            value = losses.reverse_kl(s, t, valid, cfg.temperature)
        elif name == "topk_kl":
            value = losses.topk_kl(s, t, valid, cfg.topk, cfg.temperature)
        else:
            value = losses.lm_loss(s, labels, valid)
        parts[name] = (weight, value)
    return parts


def distill_loss(teacher: nn.Module, cfg, teacher_layers: tuple[int, ...], chunked: bool = True,
                 budgets: tuple[int, int] = (losses.HEAD_CHUNK_BYTES, losses.LOSS_CHUNK_BYTES)):
    """The configured mix of KD losses: (module, input_ids) -> (loss, {part: value}).

    `chunked` (where both output layers allow it, `output_head`): the logit losses run on chunks of positions
    through both models' output layers (`losses.chunked_head_loss`, `budgets` of float32 logits per matmul and per
    loss evaluation), so neither model's full (B, S-1, V) logits exist: for SmolLM2 at 4 x 256 tokens that spares
    ~1 GB of logits, log-probabilities and their gradients a step, at the same speed. Value and gradient equal the
    full-logits computation up to float rounding (tests/test_distill.py).

    The hidden-state loss pairs the student's `.states` (the outputs of its layers `Student.hidden_layers`) with
    the outputs of the teacher's layers `teacher_layers`, one for one, all before the final norm (`layer_outputs`).
    """
    if cfg.hidden_weight and not teacher_layers:
        raise ConfigError(f"distill.hidden_weight={cfg.hidden_weight} needs pairs of student and teacher layers, "
                          "and this run has none; set distill.hidden_weight=0.")
    weights = logit_loss_parts(cfg)
    t_head = losses.output_head(teacher)
    t_names = layer_names(teacher, teacher_layers)

    def compute(module: nn.Module, ids: torch.Tensor):
        keep = predicting_positions(ids)
        labels = ids[:, 1:]  # (B, S-1)
        valid = torch.ones(labels.shape, device=ids.device)
        student_model = getattr(module, "module", module).model  # DDP keeps the Student in .module
        parts = {}
        if chunked and weights and t_head is not None and losses.output_head(student_model) is not None:
            with torch.no_grad(), layer_outputs(teacher, t_names) as t_states:
                t_out = teacher.base_model(input_ids=ids, use_cache=False)
                t_hidden = t_out.last_hidden_state[:, keep].flatten(0, 1)  # (N, H_teacher), N = B * (S-1)
            flat_labels, flat_valid = labels.reshape(-1), valid.reshape(-1)
            tokens = flat_valid.sum().clamp_min(1.0)

            def chunk_loss(s: torch.Tensor, t: torch.Tensor, rows: slice):  # (m, V) student and teacher logits
                share = flat_valid[rows].sum() / tokens  # a token mean over the rows -> their part of the mean
                chunk = {k: (w, v * share) for k, (w, v) in
                         logit_losses(s, t, flat_labels[rows], flat_valid[rows], cfg).items()}
                return sum(w * v for w, v in chunk.values()), {k: v for k, (_, v) in chunk.items()}

            def head_loss(hidden: torch.Tensor, head: nn.Linear):
                return losses.chunked_head_loss(hidden.flatten(0, 1), head, chunk_loss, (t_hidden, t_head), budgets)

            student = module(ids, logits_to_keep=keep, head_loss=head_loss)
            logit_total = student.loss
            parts = {k: (weights[k], v) for k, v in student.parts.items()}
        else:
            with torch.no_grad(), layer_outputs(teacher, t_names) as t_states:
                t_out = teacher(input_ids=ids, use_cache=False, logits_to_keep=keep)
            student = module(ids, logits_to_keep=keep)
            parts = logit_losses(student.logits, t_out.logits, labels, valid, cfg)  # (B, S-1, V) each
            logit_total = sum(w * v for w, v in parts.values())
        total = logit_total
        if cfg.hidden_weight:
            every_position = torch.ones(ids.shape, device=ids.device)
            hidden = losses.hidden_state_loss(student.states, t_states, None, every_position, cfg.hidden_loss)
            parts["hidden"] = (cfg.hidden_weight, hidden)
            total = total + cfg.hidden_weight * hidden
        return total, {k: v.detach() for k, (_, v) in parts.items()}

    return compute


def lm_only_loss(module: nn.Module, ids: torch.Tensor):
    """Plain LM fine-tuning (teacher correction)."""
    logits = module(input_ids=ids, use_cache=False, logits_to_keep=predicting_positions(ids)).logits  # (B, S-1, V)
    loss = losses.lm_loss(logits, ids[:, 1:], torch.ones_like(ids[:, 1:], dtype=torch.float32))
    return loss, {"lm": loss.detach()}


def checkpoint_fingerprint(checkpoint: Path) -> str | None:
    return json.loads((checkpoint / "state.json").read_text()).get("fingerprint")


def set_aside(ckpt_dir: Path, metrics_path: Path) -> None:
    """Move a stale run's checkpoints and metrics to *.previous (replacing an older set-aside run)."""
    if is_rank_zero():
        for path, target in ((ckpt_dir, ckpt_dir.with_name(f"{ckpt_dir.name}.previous")),
                             (metrics_path, metrics_path.with_name(f"{metrics_path.stem}.previous.jsonl"))):
            if path.exists():
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(path, target)
    barrier()


def _read_metrics(path: Path, upto_step: int) -> list[dict]:
    """The metric rows up to the checkpoint's step. Rows are appended one line at a time, so a kill during an append
    can leave a torn last line: it is dropped (its step is past the checkpoint anyway); a bad line elsewhere is
    damage this run did not make, and stops with the file named."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                log.warning(f"{path.name}: dropping a torn last line (an interrupted append)")
                break
            raise ConfigError(f"{path}: line {number} is not JSON ({err.msg}); delete the file (the metrics of "
                              "earlier steps are lost, training resumes from its checkpoint) or fix the line.") from err
    return [r for r in rows if r["step"] <= upto_step]


def _sharded_replica(module: nn.Module, units: tuple[str, ...]) -> nn.Module:
    """An FSDP2-sharded copy of `module` to train; `module` waits on the CPU for the trained weights."""
    replica = copy.deepcopy(module)
    module.to("cpu")  # its device memory goes to the shards, gradients and optimizer state
    fully_shard_units(replica, units)
    return replica


def input_embedding(module: nn.Module) -> nn.Module | None:
    """The input embedding of the (first) model inside `module` (a Student, a causal LM, a DDP or FSDP wrapper)."""
    for inner in module.modules():
        try:
            embedding = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
        except NotImplementedError:  # a transformers model class that does not say
            continue
        if isinstance(embedding, nn.Module):
            return embedding
    return None


@contextmanager
def release_memory_at_backward_of(embedding: nn.Module | None):
    """For the forwards inside the block, give the CPU allocator's free memory back when their backward reaches
    `embedding`, the model's input embedding (nothing where None). The layers' activations are free by then, and the
    embedding's dense (V, H) gradient, the last and one of the largest tensors of the step, comes next. jemalloc,
    keeping freed memory (allocator.keep_freed_memory), does not join the activations' freed extents until it gives
    them back, so that gradient (84 MB for the SmolLM2 student) would take new memory: 0.1 GiB above the forward's
    peak at the end of backward in the float32 default recipe. Released here, the step's peak stays the forward's.
    """
    def on_output(_module, _args, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda _grad: release_freed_memory())  # returns None: the gradient is unchanged

    handle = embedding.register_forward_hook(on_output) if embedding is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@torch.enable_grad()  # callers may hold no_grad (e.g. an evaluation context); training needs gradients
def train(module: nn.Module, windows: torch.Tensor, compute_loss, cfg, run_dir: Path, name: str, fingerprint: str,
          evaluate_fn=None, seed: int = 0, shard_units: tuple[str, ...] = ()) -> list[dict]:
    """Train `module` on packed `windows` (N, S); checkpoints in run_dir/<name>_ckpt, metrics in <name>_metrics.jsonl.

    Args:
        compute_loss: (module, input_ids) -> (loss, {part: tensor}).
        cfg: max_steps, micro_batch_size, global_batch_size, lr, min_lr_ratio, warmup_steps, weight_decay,
            max_grad_norm, precision, recompute_products, strategy, eval_every, save_every, keep_checkpoints
            (DistillConfig).
        fingerprint: identifies the run's inputs; checkpoints with another fingerprint (a new target in the same
            output_dir, changed settings) are moved to <name>_ckpt.previous and training starts over.
        evaluate_fn: (module being trained) -> {metric: value}, called every eval_every steps and at the end, on
            every rank (under FSDP the module is the sharded replica, whose forward is collective).
        shard_units: names of `module`'s submodules that become FSDP units (its decoder layers) when
            cfg.strategy is fsdp under torchrun; the trained weights are copied back into `module` at the end.

    Returns:
        The metric rows of every step (train parts, lr, grad_norm, tokens; eval metrics where evaluated).
    """
    device = next(module.parameters()).device
    ckpt_dir, metrics_path = run_dir / f"{name}_ckpt", run_dir / f"{name}_metrics.jsonl"
    world = world_size()
    micro_batch, accum = batch_split(cfg.global_batch_size, cfg.micro_batch_size, world)
    fsdp = is_distributed() and cfg.strategy == "fsdp"
    if device.type == "cpu":
        release_freed_memory()  # what earlier stages left free, before the steps' memory is kept
        if kept := keep_freed_memory():
            log.info(f"{name}: freed CPU memory is kept for reuse within a step ({kept}) and given back after it")
    trained = _sharded_replica(module, shard_units) if fsdp else module
    if fsdp:
        local = sum(p.to_local().numel() for p in trained.parameters())
        log.info(f"{name}: FSDP2 over {world} processes, {len(shard_units)} layer units + the root; this process "
                 f"holds {local:,} of {sum(p.numel() for p in module.parameters()):,} parameters")
    params = [p for p in trained.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a dozen elementwise passes (0.19 s -> 0.06 s a step for
    # SmolLM2's 84M-parameter student on 2 CPU cores)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    start = 0
    checkpoint = latest_checkpoint(ckpt_dir)
    if checkpoint is not None and checkpoint_fingerprint(checkpoint) != fingerprint:
        set_aside(ckpt_dir, metrics_path)
        log.warning(f"{name}: {ckpt_dir} came from other settings (another plan or {name} config); starting over. "
                    f"Its checkpoints and metrics moved to {ckpt_dir.name}.previous / {metrics_path.stem}.previous"
                    ".jsonl.")
        checkpoint = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trained, optimizer, scheduler)
        start = state["step"]
        log.info(f"{name}: resuming from {checkpoint} (step {start} of {cfg.max_steps})")
    history = _read_metrics(metrics_path, start)
    if is_rank_zero():  # drop rows past the checkpoint; one rename, so a kill here cannot lose the earlier rows
        tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        tmp.replace(metrics_path)
    ddp = is_distributed() and not fsdp
    wrapped = nn.parallel.DistributedDataParallel(module) if ddp else trained
    dtype = autocast_dtype(cfg.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext
    order = SampleOrder(len(windows), seed)
    seq = windows.shape[1]
    trained.train()
    embedding = input_embedding(trained) if device.type == "cpu" else None
    bar = progress(range(start, cfg.max_steps), total=cfg.max_steps - start, desc=name)
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for step in bar:
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            first = step * cfg.global_batch_size + (micro * world + rank()) * micro_batch
            ids = windows[[order(first + k) for k in range(micro_batch)]].to(device)
            last = micro == accum - 1  # gradients are reduced across ranks once, after the last micro-batch
            if fsdp:
                trained.set_requires_gradient_sync(last)
            with wrapped.no_sync() if ddp and not last else nullcontext():
                with (autocast(), recompute_products(cfg.recompute_products),
                      release_memory_at_backward_of(embedding)):
                    loss, parts = compute_loss(wrapped, ids)
                (loss / accum).backward()
            parts = {"loss": loss.detach(), **parts}
            # the loss holds its graph's nodes, which would sit in the freed activations and split them until the
            # next step's loss replaced it (~0.3 GB more resident memory for SmolLM2)
            del loss
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.float() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step used (scheduler.step() moves to the next one)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # here, so evaluation and checkpoints below run without them
        scheduler.step()
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[k] for k in keys])) / world
        row = {"step": step + 1, **{k: float(v) for k, v in zip(keys, reduced)}, "lr": lr,
               "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
               "tokens": (step + 1) * cfg.global_batch_size * seq, "seconds": round(time.perf_counter() - started, 2)}
        done = step + 1 == cfg.max_steps
        evaluated = evaluate_fn is not None and ((step + 1) % cfg.eval_every == 0 or done)
        if evaluated:
            trained.eval()
            row.update(evaluate_fn(trained))
            trained.train()
        if hasattr(bar, "set_postfix"):
            shown = {"loss": f"{row['loss']:.3f}"}
            if "eval_perplexity" in row:
                shown["ppl"] = f"{row['eval_perplexity']:.1f}"
            bar.set_postfix(shown)
        history.append(row)
        if is_rank_zero():
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        saved = (step + 1) % cfg.save_every == 0 or done
        if saved:
            save_checkpoint(ckpt_dir, step + 1, trained, optimizer, scheduler, {"fingerprint": fingerprint},
                            keep=cfg.keep_checkpoints)
        if device.type == "cpu" and not done:
            # what the step left free (and the evaluation or checkpoint write): the allocator's free memory splits
            # further every step until it is given back (allocator.py), so it is given back after each one
            release_freed_memory()
    trained.eval()
    del optimizer, scheduler
    if device.type == "cpu":
        release_freed_memory()  # the optimizer state and what the steps kept free
    if fsdp:  # whole tensors on every rank, into the unsharded module
        module.load_state_dict(get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True)))
        module.to(device).eval()
    return history
