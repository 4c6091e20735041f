"""The megatron backend: llama-like HF models as megatron-core GPTModels split over tensor-parallel ranks.

convert.py maps HF checkpoints to and from megatron-core's layout; parallel.py sets up the process groups.
The adapter (llmprune/backends/megatron/adapter.py) scores, prunes and exports. megatron-core is an optional
dependency (`pip install "llmprune[megatron]"`); nothing here imports it until a model is converted.
"""
