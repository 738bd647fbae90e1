"""Qwen3.5 serving on Ray Serve with its own PyTorch + Triton engine."""
