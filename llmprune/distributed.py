"""torchrun helpers: rank-zero discipline and score reduction. Single-process runs need no setup."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of `group` (None: all ranks; a no-op in a single process). Returns the same tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def data_shard(adapter) -> tuple[int, int]:
    """(index, count) of this rank's share of the samples. Every rank scores its own share, except that an adapter
    splitting one model over several ranks (megatron tensor parallelism) names the group whose ranks each hold a
    whole model (`data_parallel_group`); the ranks that share a model share its samples."""
    group = getattr(adapter, "data_parallel_group", None)
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def fully_shard_units(module: torch.nn.Module, unit_names: list[str] | tuple[str, ...]) -> None:
    """FSDP2 in place over all processes: each named submodule (a decoder layer) is one unit, gathered only while
    it runs; the root unit holds the rest (embeddings, final norm, LM head). Parameters become DTensor shards, so
    build the optimizer afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(module.parameters()).device.type, (world_size(),))
    for name in unit_names:
        fully_shard(module.get_submodule(name), mesh=mesh)
    fully_shard(module, mesh=mesh)
