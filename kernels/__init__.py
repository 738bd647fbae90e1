"""Ops of the Qwen3.5 hybrid model, installed as `qwen35_kernels`.

One folder per op: `naive.py` is the plain fp32 reference; the other files hold the paths the
model runs. Each op's public function sends CUDA tensors to its Triton kernel (`<op>_triton`)
and others to its PyTorch path (`<op>_torch`); a model built with a kernel backend
(qwen35_ray.model.kernel_backend) calls one side directly, chosen once. Shapes follow
flash-linear-attention: flat varlen batches of T tokens described by `cu_seqlens` [B+1] (int32,
starting at 0), heads on the second axis.
"""
