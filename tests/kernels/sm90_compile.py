"""Compile every Triton launch of an op for an H100/H200 (sm_90) on a machine without a GPU.

Run as a script in a process without TRITON_INTERPRET (the kernels must be imported as
compiled kernels, not interpreted ones). The op runs on CPU tensors with each launch recorded
instead of run (its outputs are garbage; only the arguments matter), then every recorded
launch is compiled with Triton's own ptxas for the target, as a launch would specialise it
(16-byte-aligned pointers), and cuobjdump reports its registers, stack (spills) and shared
memory. Prints one JSON list, a dict per launch.

    python tests/kernels/sm90_compile.py gdn_chunk   # Qwen3.5-397B GDN shapes, bf16
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import torch

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}  # fmt: skip


def record_launches(op, *args, **kwargs) -> list:
    """(kernel, positional args, keyword args) of every launch op makes, none of them run."""
    from triton.runtime.jit import JITFunction

    launches = []
    run = JITFunction.run

    def record(self, *a, grid, warmup, **kw):
        launches.append((self, a, kw))

    JITFunction.run = record
    try:
        op(*args, **kwargs)
    finally:
        JITFunction.run = run
    return launches


def compile_launch(kernel, args, kwargs, arch: int = 90) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names, args)) | kwargs
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        x = values[p.name]
        if p.is_constexpr or x is None:
            signature[p.name], constexprs[(i,)] = "constexpr", x
        elif isinstance(x, torch.Tensor):
            signature[p.name], attrs[(i,)] = "*" + DTYPES[x.dtype], [["tt.divisibility", 16]]
        elif isinstance(x, bool):
            signature[p.name] = "i1"
        elif isinstance(x, int):
            signature[p.name] = "i32" if abs(x) < 2**31 else "i64"
            if x % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32"
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.__name__,
        "num_warps": options.get("num_warps", 4),
        "registers": int(fields["REG"]),
        "stack_bytes": int(fields["STACK"]),
        "shared_bytes": compiled.metadata.shared,
        "wgmma": ptx.count("wgmma.mma_async"),
        "mma_sync": ptx.count("mma.sync"),
    }


def gdn_chunk_launches(dtype=torch.bfloat16, T=100, H=16, HV=64, K=128):
    from qwen35_kernels.gdn.chunk_triton import chunk_gated_delta_rule_triton

    q, k = (torch.randn(T, H, K, dtype=dtype) for _ in range(2))
    v = torch.randn(T, HV, K, dtype=dtype)
    g, beta = -torch.rand(T, HV), torch.rand(T, HV)
    cu = torch.tensor([0, T], dtype=torch.int32)
    state = torch.zeros(1, HV, K, K)
    idx, has_initial = torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.bool)
    return record_launches(
        chunk_gated_delta_rule_triton, q, k, v, g, beta, cu, state, idx, has_initial
    )


OPS = {"gdn_chunk": gdn_chunk_launches}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET=1"
    launches = OPS[sys.argv[1]]()
    print(json.dumps([compile_launch(*launch) for launch in launches]))
