"""Distillation of the pruned student from the teacher: the training loop (train), its losses (losses), exact-resume
checkpoints (checkpoint) and the cached teacher logits (cache). Import from the submodules: evaluation uses the
chunked LM-head losses without the training loop."""
