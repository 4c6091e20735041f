"""Model parallelism for the megatron backend: process groups from torchrun, the layers' split into pipeline stages,
and gathers of tensor-parallel shards and of pipeline stages.

megatron-core's `parallel_state` orders ranks tp-cp-ep-dp-pp: tensor-parallel ranks sit next to each other, then
data-parallel replicas, and the pipeline stages are the outermost blocks. With 4 processes and TP=2, ranks {0, 1} and
{2, 3} each hold one copy of the model split in two, and {0, 2}, {1, 3} are the data-parallel groups. With 4
processes, TP=2 and PP=2, ranks {0, 1} are stage 0 and {2, 3} stage 1 of the one replica, and the pipeline groups
(the ranks that hand hidden states to each other) are {0, 2} and {1, 3}. With 4 processes and PP=2 alone, stage 0 is
{0, 1}, stage 1 is {2, 3}: ranks 0 and 2 form one replica, 1 and 3 the other. All ranks of one replica must see the
same samples; scores are summed over the data-parallel group, then gathered over the pipeline group.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmprune.distributed import Stages
from llmprune.errors import ConfigError

INSTALL_HINT = 'pip install "llmprune[megatron]" (or pip install megatron-core)'


def require_megatron() -> None:
    """Raise a ConfigError when megatron-core is missing (naming the install command) or cannot run here: its layers
    place tensors with torch.cuda.current_device(), which needs a CUDA GPU."""
    try:
        with warnings.catch_warnings():  # "Apex / TransformerEngine not installed" fallbacks of unused optimizers
            warnings.simplefilter("ignore", UserWarning)
            import megatron.core  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"backend=megatron needs megatron-core, which is not installed: {INSTALL_HINT}.") from err
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as err:
        raise ConfigError(
            "backend=megatron needs a CUDA GPU: megatron-core's layers call CUDA-only APIs "
            f"({type(err).__name__}: {err}). Use backend=hf on CPU-only machines (the test suite runs megatron-core on "
            "CPU through a test-only shim, tests/megatron_cpu.py).") from err


@dataclass
class Parallel:
    """This process's place in the model-parallel layout.

    Attributes:
        tp / pp / dp: tensor-, pipeline- and data-parallel sizes (tp * pp * dp = world size).
        tp_rank / pp_rank / dp_rank: this process's rank in each.
        tp_group / pp_group / dp_group: process groups.
        pp_ranks: the global ranks of pp_group, in stage order.
        device: where this rank's shard lives.
        owns_process_group: the default process group was created here (a single process) and is destroyed by close().
    """

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object
    pp_ranks: tuple[int, ...]
    device: torch.device
    owns_process_group: bool = False

    def stages(self, sizes: list[int]) -> Stages:
        """The pipeline stages of a model whose stage p holds sizes[p] layers."""
        assert len(sizes) == self.pp, (sizes, self.pp)
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        return Stages(tuple(starts), self.pp_rank, self.pp_group if self.pp > 1 else None, self.pp_ranks, self.device)


def stage_sizes(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: an even split; where num_layers is not a multiple of PP, the first stages take one
    layer more (the last stage also runs the output layer)."""
    return [num_layers // pp + (p < num_layers % pp) for p in range(pp)]


def _init_process_group() -> bool:
    """The default process group: torchrun's (already set up by `python -m llmprune`), or a one-process group."""
    if dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun, but the caller did not set up the group
        dist.init_process_group(backend)
        return True
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def init_model_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, seed: int = 0) -> Parallel:
    """Set up megatron-core's tensor / pipeline / data-parallel groups over the current processes.

    The world (torchrun's processes, or this one process) is split into model replicas of TP x PP ranks; the rest is
    data parallelism (see the module docstring for which ranks are stages of one replica). nccl on GPUs, gloo on CPU.
    Re-initializes megatron's groups when they exist with other sizes.

    Raises:
        ConfigError: megatron-core is missing, no CUDA device, or the world size is not a multiple of TP x PP.
    """
    require_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp, pp = tensor_parallel_size, pipeline_parallel_size
    owns = _init_process_group()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ConfigError(f"megatron.tensor_parallel_size={tp} x megatron.pipeline_parallel_size={pp} must divide "
                          f"the number of processes ({world}); launch a multiple of {tp * pp} processes.")
    if parallel_state.model_parallel_is_initialized() and (
            parallel_state.get_tensor_model_parallel_world_size() != tp
            or parallel_state.get_pipeline_model_parallel_world_size() != pp):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Parallel(tp=tp, pp=pp, dp=world // (tp * pp), tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                    pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                    dp_rank=parallel_state.get_data_parallel_rank(),
                    tp_group=parallel_state.get_tensor_model_parallel_group(),
                    pp_group=parallel_state.get_pipeline_model_parallel_group(),
                    dp_group=parallel_state.get_data_parallel_group(),
                    pp_ranks=tuple(dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())),
                    device=device, owns_process_group=owns)


def close(parallel: Parallel) -> None:
    """Tear down megatron's groups, and the default process group when init_model_parallel created it."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if parallel.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def gather_tp(shard: torch.Tensor, parallel: Parallel) -> list[torch.Tensor]:
    """Every TP rank's shard of a tensor, in TP-rank order (all ranks of the group receive all of them)."""
    if parallel.tp == 1:
        return [shard]
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(parallel.tp)]
    dist.all_gather(parts, shard, group=parallel.tp_group)
    return parts


def gather_stages(tensors: dict[str, torch.Tensor], parallel: Parallel) -> dict[str, torch.Tensor]:
    """Every pipeline stage's `tensors` (its layers' scores or weights) on every rank of the pipeline group, in stage
    order and bit for bit, on the CPU. Names, shapes and dtypes go round as objects, then each tensor is broadcast
    from the stage holding it (on the model's device: nccl sends CUDA tensors)."""
    if parallel.pp == 1:
        return tensors
    specs = [None] * parallel.pp
    dist.all_gather_object(specs, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, group=parallel.pp_group)
    out = {}
    for stage, spec in enumerate(specs):
        for name, (shape, dtype) in spec.items():
            if stage == parallel.pp_rank:
                tensor = tensors[name].contiguous().to(parallel.device)
            else:
                tensor = torch.empty(shape, dtype=dtype, device=parallel.device)
            dist.broadcast(tensor, parallel.pp_ranks[stage], group=parallel.pp_group)
            out[name] = tensor.cpu()
    return out
