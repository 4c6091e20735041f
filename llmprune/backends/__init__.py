"""Backends other than live Hugging Face modules: megatron-core with tensor and pipeline parallelism."""
