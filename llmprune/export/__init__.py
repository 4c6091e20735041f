"""Export: Hugging Face directories (stock transformers), the Hub, and streamed safetensors shards."""
