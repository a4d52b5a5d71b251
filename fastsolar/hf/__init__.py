"""Hugging Face transformers: its argument names translated onto fastsolar's (`compat`), and fastsolar's kernels
patched into a transformers model (`patch`)."""
