"""torchrun helpers: rank-zero discipline, score reduction, and the hand-over between pipeline stages. Single-process
runs need no setup."""

from __future__ import annotations

from dataclasses import dataclass

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
    splitting one model over several ranks (megatron tensor and pipeline parallelism) names the group of ranks at the
    same place in different model replicas (`data_parallel_group`); the ranks that share a model share its samples."""
    group = getattr(adapter, "data_parallel_group", None)
    if not is_distributed():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


# the dtypes a hidden state can have, by their code in a hand-over header
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 8  # dtype code, number of dims, up to 6 sizes


@dataclass(frozen=True)
class Stages:
    """Where a model's layers live when pipeline parallelism splits them over ranks (one stage: all of them here).

    Stage p holds the layers starts[p] .. starts[p + 1] - 1 (global indices); starts ends with the layer count.
    Activation scoring and depth scoring (importance.py, depth.py) run every stage's own layers and hand the hidden
    states on with point-to-point sends inside `group`; layer-indexed totals are summed over it.

    Attributes:
        starts: first layer of each stage, then the number of layers (len = stages + 1).
        stage: this rank's stage.
        group: the ranks holding the stages of this rank's model replica (None for one stage).
        ranks: their global ranks, in stage order (send / recv / broadcast take global ranks).
        device: where hand-overs and gathers travel (the model's device; CUDA for nccl).
    """

    starts: tuple[int, ...]
    stage: int = 0
    group: object = None
    ranks: tuple[int, ...] = (0,)
    device: torch.device = torch.device("cpu")

    @classmethod
    def single(cls, num_layers: int) -> Stages:
        return cls((0, num_layers))

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.count - 1

    @property
    def num_layers(self) -> int:
        return self.starts[-1]

    @property
    def layer_ids(self) -> range:
        """Global indices of this stage's layers."""
        return range(self.starts[self.stage], self.starts[self.stage + 1])

    def stage_of(self, layer: int) -> int:
        """The stage holding global layer `layer` (a stage may hold none)."""
        return max(p for p in range(self.count) if self.starts[p] <= layer)

    def send_next(self, tensor: torch.Tensor) -> None:
        """Hand `tensor` to the next stage (a header with its dtype and shape first, so recv_prev needs neither)."""
        assert tensor.dim() <= _HEADER - 2 and tensor.dtype in _DTYPES, (tuple(tensor.shape), tensor.dtype)
        header = torch.zeros(_HEADER, dtype=torch.long)
        header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
        header[2: 2 + tensor.dim()] = torch.tensor(tensor.shape)
        dst = self.ranks[self.stage + 1]
        dist.send(header.to(self.device), dst, group=self.group)
        dist.send(tensor.contiguous().to(self.device), dst, group=self.group)

    def recv_prev(self) -> torch.Tensor:
        """What the previous stage handed on with send_next."""
        src = self.ranks[self.stage - 1]
        header = torch.empty(_HEADER, dtype=torch.long, device=self.device)
        dist.recv(header, src, group=self.group)
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        tensor = torch.empty(header[2: 2 + ndim].tolist(), dtype=dtype, device=self.device)
        dist.recv(tensor, src, group=self.group)
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the stages (in place; returns it): layer-indexed totals that each stage filled for its layers."""
        if self.count > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def layer_stages(adapter) -> Stages:
    """The adapter's pipeline stages (megatron pipeline parallelism), or one stage holding all its layers."""
    return getattr(adapter, "stages", None) or Stages.single(len(adapter.layers))


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
