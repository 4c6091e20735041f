#!/usr/bin/env bash
# Usage: launch/torchrun.sh NPROC recipe=<name> [key=value ...]
# One node, NPROC processes (GPUs, or CPU processes with the gloo backend when no GPU is visible).
# Calibration is sharded across the processes and the scores are all-reduced, so all build the same plan;
# rank 0 writes the run directory.
#   launch/torchrun.sh 2 recipe=smollm2_minitron output_dir=runs/smol
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC recipe=<name> [key=value ...]}"
shift
exec torchrun --standalone --nproc_per_node="$nproc" -m llmprune "$@"
