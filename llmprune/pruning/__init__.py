"""The pruning map (per family, as data) and the one applier that executes it on live models, megatron layers
and safetensors checkpoints streamed one tensor at a time."""
