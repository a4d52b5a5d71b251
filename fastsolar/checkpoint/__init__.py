"""Hugging Face checkpoints on disk: safetensors headers and the streaming reader (`shards`), the key map
(`hf_keys`, plain data), the strict loader (`loader`), quantising at load and llm-compressor checkpoints
(`quant_load`), and Depth Up-Scaling, which writes a new checkpoint (`upscale`)."""
