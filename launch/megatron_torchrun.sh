#!/usr/bin/env bash
# Usage: launch/megatron_torchrun.sh NGPUS TP recipe=<name> [key=value ...]
# backend=megatron on one node: NGPUS processes, one per GPU (nccl), each model split over TP GPUs
# (megatron.tensor_parallel_size=TP; pipeline parallelism is not supported yet, so PP stays 1). The NGPUS / TP
# model replicas score separate calibration samples and all build the same plan. Calibration and pruning run on
# megatron-core (TransformerEngine layers where installed); evaluation, export and distillation then run on the
# pruned Hugging Face student. model.device=cpu keeps the Hugging Face teacher in CPU memory.
#   launch/megatron_torchrun.sh 8 4 recipe=llama31_minitron_4b_width model.path=/data/Llama-3.1-8B model.device=cpu
# Several nodes: launch/slurm.sbatch with backend=megatron megatron.tensor_parallel_size=TP.
set -euo pipefail
usage="usage: launch/megatron_torchrun.sh NGPUS TP recipe=<name> [key=value ...]"
ngpus="${1:?$usage}"
tp="${2:?$usage}"
shift 2
exec torchrun --standalone --nproc_per_node="$ngpus" -m llmprune backend=megatron \
  megatron.tensor_parallel_size="$tp" "$@"
