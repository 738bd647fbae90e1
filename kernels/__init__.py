"""Ops of the Qwen3.5 hybrid model, installed as `qwen35_kernels`.

One folder per op: `naive.py` is the plain fp32 reference; the other files hold the paths the
model runs. Shapes follow flash-linear-attention: flat varlen batches of T tokens described by
`cu_seqlens` [B+1] (int32, starting at 0), heads on the second axis.
"""
