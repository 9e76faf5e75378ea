"""Transformer encoders built from kernels/, loaded from Hugging Face folders (safetensors)."""
