"""`python -m llmprune` with megatron-core's CUDA-only calls redirected to the CPU (tests/megatron_cpu.py), for
torchrun tests of backend=megatron: torchrun --nproc_per_node=2 tests/megatron_launch.py recipe=... backend=megatron"""

import sys

from megatron_cpu import megatron_on_cpu

from llmprune.__main__ import main

if __name__ == "__main__":
    with megatron_on_cpu():
        sys.exit(main(sys.argv[1:]))
