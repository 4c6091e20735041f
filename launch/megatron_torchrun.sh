#!/usr/bin/env bash
# Usage: launch/megatron_torchrun.sh NGPUS TP [PP] recipe=<name> [key=value ...]
# backend=megatron on one node: NGPUS processes, one per GPU (nccl), each model split over TP GPUs
# (megatron.tensor_parallel_size=TP) and PP pipeline stages (megatron.pipeline_parallel_size=PP, default 1), so one
# model replica takes TP x PP GPUs. The NGPUS / (TP x PP) replicas score separate calibration samples and all build
# the same plan. Calibration and pruning run on megatron-core (TransformerEngine layers where installed); evaluation,
# export and distillation then run on the pruned Hugging Face student. model.device=cpu keeps the Hugging Face
# teacher in CPU memory.
#   launch/megatron_torchrun.sh 8 4 recipe=llama31_minitron_4b_width model.path=/data/Llama-3.1-8B model.device=cpu
#   launch/megatron_torchrun.sh 8 4 2 recipe=llama31_minitron_4b_width model.path=/data/Llama-3.1-8B
# Several nodes: launch/slurm.sbatch with backend=megatron megatron.tensor_parallel_size=TP
# megatron.pipeline_parallel_size=PP.
set -euo pipefail
usage="usage: launch/megatron_torchrun.sh NGPUS TP [PP] recipe=<name> [key=value ...]"
ngpus="${1:?$usage}"
tp="${2:?$usage}"
shift 2
pp=1
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then  # the optional PP: a number, not a key=value override
  pp="$1"
  shift
fi
exec torchrun --standalone --nproc_per_node="$ngpus" -m llmprune backend=megatron \
  megatron.tensor_parallel_size="$tp" megatron.pipeline_parallel_size="$pp" "$@"
