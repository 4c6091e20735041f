#!/usr/bin/env bash
# Usage: bash bench/gpu_check.sh                 (one NVIDIA GPU; within 8 minutes: the budget below stops it)
#        GPU_CHECK_DRY=1 bash bench/gpu_check.sh (print the sections' commands, run nothing; needs no GPU)
#
# The GPU path in one go, each section in its own process with its own time limit, so one failing section does not
# stop the others:
#   pytest    the GPU-marked tests (pytest -m gpu)
#   recipe    the default recipe (smollm2_minitron) on the GPU with bf16 distillation, and its distillation step
#             timed against its parts (student forward + backward, teacher forward) measured alone
#   fsdp      the same recipe with distill.strategy=fsdp under torchrun --nproc_per_node=1 (nccl process group)
#   megatron  backend=megatron at TP=1 under torchrun, with TransformerEngine layers where transformer_engine imports
# Each section reports the peak GPU memory of its process (torch.cuda.max_memory_allocated). The whole script stays
# within GPU_CHECK_BUDGET_S (default 450 s): a section gets at most its own limit and what the budget has left.
# Writes bench/results/gpu.md and gpu.json (commit, command, GPU, per-section status, numbers and the last lines
# each section printed); exits 1 when any section failed (the summary names them), and at once, loudly, without
# writing results, when no GPU is visible.
#
# Variables: GPU_CHECK_SECTIONS="pytest recipe fsdp megatron" (a subset), GPU_CHECK_BUDGET_S=450,
# GPU_CHECK_OUT=/tmp/llmprune_gpu_check (run directories and logs), GPU_CHECK_DRY=1,
# GPU_CHECK_ALLOW_CPU=1 (rehearse the sections on a CPU with small settings; results go to $GPU_CHECK_OUT/gpu.md,
# never to bench/results), GPU_CHECK_MODEL (model.path, default the recipe's embedded SmolLM2-135M),
# GPU_CHECK_OVERRIDES (extra key=value overrides for every recipe section).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
sections="${GPU_CHECK_SECTIONS:-pytest recipe fsdp megatron}"
budget="${GPU_CHECK_BUDGET_S:-450}"
work="${GPU_CHECK_OUT:-/tmp/llmprune_gpu_check}"
dry="${GPU_CHECK_DRY:-0}"
allow_cpu="${GPU_CHECK_ALLOW_CPU:-0}"
python="${PYTHON:-python}"
torchrun=("$python" -m torch.distributed.run --standalone --nproc_per_node=1)
settings=""
for v in GPU_CHECK_SECTIONS GPU_CHECK_BUDGET_S GPU_CHECK_MODEL GPU_CHECK_OVERRIDES GPU_CHECK_ALLOW_CPU; do
  [[ -n "${!v:-}" ]] && settings+="$v=$(printf '%q' "${!v}") "
done
export GPU_CHECK_COMMAND="${settings}bash bench/gpu_check.sh"

# the recipe sections' overrides: the model, a short FSDP / megatron distillation, and anything the caller adds
read -r -a extra <<< "${GPU_CHECK_OVERRIDES:-}"
model=(); [[ -n "${GPU_CHECK_MODEL:-}" ]] && model=("model.path=$GPU_CHECK_MODEL")
if [[ "$allow_cpu" == 1 ]]; then  # a rehearsal: the same code paths on a few short samples
  extra=(data.num_samples=4 data.eval_samples=2 data.seq_len=32 data.batch_size=2 distill.max_steps=6
         distill.eval_every=3 distill.save_every=3 distill.warmup_steps=1 distill.micro_batch_size=2
         distill.global_batch_size=2 "${extra[@]}")
fi
short=(distill.max_steps=20 distill.eval_every=10 distill.save_every=10)

# section -> (its own limit in seconds, command)
declare -A limit=([pytest]=150 [recipe]=210 [fsdp]=150 [megatron]=180)
command_of() {
  case "$1" in
    pytest) echo "$python bench/gpu_check.py pytest" ;;
    recipe) echo "$python bench/gpu_check.py recipe $work/recipe ${model[*]} ${extra[*]}" ;;
    fsdp) echo "${torchrun[*]} bench/gpu_check.py fsdp $work/fsdp ${model[*]} ${short[*]} ${extra[*]}" ;;
    megatron) echo "${torchrun[*]} bench/gpu_check.py megatron $work/megatron ${model[*]} ${short[*]} ${extra[*]}" ;;
    *) echo "gpu_check: unknown section '$1' in GPU_CHECK_SECTIONS (known: pytest recipe fsdp megatron)" >&2
       return 1 ;;
  esac
}

if [[ "$dry" == 1 ]]; then
  echo "gpu_check (dry run): budget ${budget} s; logs and run directories under $work"
  for s in $sections; do
    cmd="$(command_of "$s")" || exit 2
    echo "[$s] timeout ${limit[$s]}s (or what the budget leaves): $cmd > $work/logs/$s.log"
  done
  echo "then: $python bench/gpu_check.py summary $work/logs bench/results/gpu.md"
  exit 0
fi

for s in $sections; do command_of "$s" > /dev/null || exit 2; done
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ "$allow_cpu" != 1 ]]; then
    gpus="$( (command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1 | head -n 1) || echo 'not installed')"
    echo "gpu_check: FAILED: no CUDA GPU visible (torch.cuda.is_available() is False; nvidia-smi -L: $gpus)." \
         "Run this on a GPU machine; nothing was run or written." >&2
    exit 1
  fi
  echo "gpu_check: no GPU; GPU_CHECK_ALLOW_CPU=1: rehearsing on the CPU (results in $work/gpu.md)" >&2
  result="$work/gpu.md"
else
  result="$root/bench/results/gpu.md"
fi

logs="$work/logs"
rm -rf "$logs" "$work/recipe" "$work/fsdp" "$work/megatron" && mkdir -p "$logs" || exit 1  # this script's own
started=$SECONDS
reserve=20  # for the summary
for s in $sections; do
  left=$(( budget - reserve - (SECONDS - started) ))
  t=${limit[$s]}; (( left < t )) && t=$left
  if (( t < 10 )); then
    echo "[$s] not run: the ${budget} s budget is spent" | tee "$logs/$s.log"
    echo 124 > "$logs/$s.rc"; echo 0 > "$logs/$s.seconds"
    continue
  fi
  cmd="$(command_of "$s")"
  echo "== [$s] (limit ${t}s) $cmd"
  t0=$SECONDS
  # shellcheck disable=SC2086  # the command is a word list built above
  timeout --signal=TERM --kill-after=10 "$t" $cmd > "$logs/$s.log" 2>&1
  rc=$?
  echo "$rc" > "$logs/$s.rc"; echo $(( SECONDS - t0 )) > "$logs/$s.seconds"
  grep -h '^GPU_CHECK_RESULT ' "$logs/$s.log" | tail -n 1
  (( rc == 0 )) && echo "   [$s] ok in $(( SECONDS - t0 ))s" || {
    echo "   [$s] FAILED (exit $rc) in $(( SECONDS - t0 ))s; last lines:" >&2
    tail -n 20 "$logs/$s.log" >&2
  }
done

"$python" bench/gpu_check.py summary "$logs" "$result"
status=$?
echo "gpu_check: $(( SECONDS - started )) s in all; logs in $logs"
exit $status
