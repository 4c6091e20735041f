"""Test-only shim: megatron-core's local (non-TransformerEngine) layers on the CPU.

megatron-core's layers are written for GPUs. Two calls stand between them and a CPU-only torch:
- `torch.cuda.current_device()` places tensors (RoPE frequencies, some buffers); here it answers "cpu".
- the CUDA RNG tracker (`tensor_parallel.random.get_cuda_rng_tracker`) forks CUDA generator states around
  dropout; here a tracker with the same interface forks the CPU generator instead.
Everything else (the layers, parallel_state, gloo collectives) is megatron-core's own code. This lives in tests/ on
purpose: the package refuses backend=megatron without CUDA (llmprune.backends.megatron.parallel).
"""

from __future__ import annotations

import contextlib

import torch


def _cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker, keeping CPU generator states."""

        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outside = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outside)

    return CpuRNGStatesTracker


@contextlib.contextmanager
def megatron_on_cpu():
    """Redirect megatron-core's CUDA-only device and RNG-tracker calls to the CPU for the duration."""
    from megatron.core.tensor_parallel import random as mrandom

    saved = (torch.cuda.current_device, mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    torch.cuda.current_device = lambda: "cpu"
    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    try:
        yield
    finally:
        torch.cuda.current_device, mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = saved
