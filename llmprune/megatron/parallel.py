"""Model parallelism for the megatron backend: process groups from torchrun, and gathers of tensor-parallel shards.

megatron-core's `parallel_state` places tensor-parallel ranks next to each other (order tp-cp-ep-dp-pp): with 4
processes and TP=2, ranks {0, 1} and {2, 3} each hold one copy of the model split in two, and {0, 2}, {1, 3} are
the data-parallel groups. All ranks of a TP group must see the same samples; scores are summed over the
data-parallel group only.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmprune.config import ConfigError

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
        tp_group / dp_group: process groups (None in a single process).
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
    dp_group: object
    device: torch.device
    owns_process_group: bool = False


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

    The world (torchrun's processes, or this one process) is split into TP x PP model replicas; the rest is data
    parallelism. nccl on GPUs, gloo on CPU. Re-initializes megatron's groups when they exist with other sizes.

    Raises:
        ConfigError: megatron-core is missing, no CUDA device, or the world size is not a multiple of TP x PP.
    """
    require_megatron()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if pp != 1:
        raise ConfigError(f"megatron.pipeline_parallel_size={pp}: pipeline parallelism is not supported yet; use "
                          "megatron.pipeline_parallel_size=1 and spread the model with megatron.tensor_parallel_size.")
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
                    dp_group=parallel_state.get_data_parallel_group(), device=device, owns_process_group=owns)


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
