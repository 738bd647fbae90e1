"""`qwen35-ray bench offline`: one workload through our engine and through transformers'
batched generate on the same checkpoint; tokens/s of each, their ratio, peak memory.

Ours is the engine `LLM(model=..., dtype=...)` builds with no other option (compiled decode
step on CPU, by default in the background: its start-up is counted until it is ready) and,
for comparison, the same with compile_decode=False. Both keep `concurrency` requests in flight;
transformers runs batches of `concurrency` prompts. `--context` measures something else: one
decode step at each context length (offline_context.py); `--images N` prompts carrying N images
each, with the vision tower's and the image preprocessing's time (offline_images.py);
`--speculative 0 1 2 3` MTP speculative decoding at each k side by side (offline_spec.py)."""

import argparse
import time
from pathlib import Path

import torch


class PeakRSS:
    """Highest resident set size while the block runs: the kernel's own peak (VmHWM), reset
    on entry through /proc/self/clear_refs. No sampling thread: one waking every few ms
    slowed a 2-thread OpenMP run by 3-5% on 2 cores. Where the reset is refused, the peak
    of the process so far."""

    def __enter__(self):
        self.start = _status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.peak = _status_kib("VmHWM")

    @property
    def extra_mib(self) -> float:
        return max(0, self.peak - self.start) / 2**10


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def workload(
    num_prompts: int,
    vocab: int,
    seed: int = 0,
    lengths: tuple[int, int] = (16, 512),
    token_ids: torch.Tensor | None = None,
) -> list[list[int]]:
    """Prompts of mixed lengths (lengths[0] to lengths[1] tokens), fixed by the seed: ids below
    vocab, or drawn from token_ids when given."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (num_prompts,), generator=gen).tolist()
    if token_ids is None:
        return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in sizes]
    picks = [torch.randint(0, len(token_ids), (n,), generator=gen) for n in sizes]
    return [token_ids[p].tolist() for p in picks]


def run_ours(path, prompts, new_tokens, concurrency, dtype, **engine_kwargs) -> dict:
    """The engine `LLM(model=path, dtype=dtype, **engine_kwargs)` builds (no engine_kwargs:
    the defaults), `concurrency` requests in flight: a new one is added as one finishes.
    start-up counts until decode steps run at full speed, its background compile included."""
    from qwen35_ray.engine.sampling_params import SamplingParams
    from qwen35_ray.llm import LLM

    start = time.perf_counter()
    engine = LLM(model=str(path), dtype=dtype, **engine_kwargs).engine
    compiled = engine.executor.wait_compiled()
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    todo = list(enumerate(prompts))[::-1]
    with PeakRSS() as mem:
        start = time.perf_counter()
        running = 0
        while todo or running:
            while todo and running < concurrency:
                i, ids = todo.pop()
                engine.add_request(str(i), ids, params)
                running += 1
            running -= sum(out.finished for out in engine.step())
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens_per_s": len(prompts) * new_tokens / seconds,
        "peak_extra_mib": mem.extra_mib,
        "startup_s": startup,
        "compiled": compiled,
        "engine_kwargs": engine_kwargs,
    }


@torch.inference_mode()
def run_transformers(path, prompts, new_tokens, concurrency, dtype) -> dict:
    import transformers

    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    with PeakRSS() as mem:
        start = time.perf_counter()
        for i in range(0, len(prompts), concurrency):
            batch = prompts[i : i + concurrency]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens_per_s": len(prompts) * new_tokens / seconds,
        "peak_extra_mib": mem.extra_mib,
    }


def main(argv: list[str] | None = None) -> int:
    from qwen35_ray.bench.timing import machine_info, write_report
    from qwen35_ray.model.config import ModelConfig
    from qwen35_ray.model.source import resolve_model

    p = argparse.ArgumentParser(prog="qwen35-ray bench offline", description=__doc__)
    p.add_argument("--model", default="qwen35-tiny")
    p.add_argument(
        "--num-prompts", type=int, help="default 64, 16 with --images, 32 with --speculative"
    )
    p.add_argument(
        "--new-tokens", type=int, help="default 128, 16 with --images, 64 with --speculative"
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--no-eager", action="store_true", help="skip the run with compile_decode=False")
    p.add_argument(
        "--context",
        type=int,
        nargs="+",
        help="instead: the time of one decode step at each of these context lengths",
    )
    p.add_argument(
        "--context-batch", type=int, nargs="+", default=[1], help="sequences per step (--context)"
    )
    p.add_argument(
        "--images", type=int, help="instead: prompts carrying this many random images each"
    )
    p.add_argument(
        "--image-size", nargs="+", default=["448x448"], help="WxH of the images (--images)"
    )
    p.add_argument(
        "--no-text", action="store_true", help="skip the text-only twin of each run (--images)"
    )
    p.add_argument(
        "--speculative",
        type=int,
        nargs="+",
        metavar="K",
        help="instead: MTP speculative decoding with K drafts (0: off), each K in turn",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="interleaved runs of each K (--speculative)"
    )
    p.add_argument(
        "--input-len",
        type=int,
        nargs=2,
        default=[64, 128],
        metavar=("MIN", "MAX"),
        help="prompt lengths in tokens (--speculative)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="(--speculative) 0: greedy, the default"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    path = resolve_model(args.model)
    report = {
        "bench": "offline",
        "model": args.model,
        "dtype": args.dtype,
        "machine": machine_info("cpu"),
        "command": "qwen35-ray bench offline " + " ".join(argv or []),
    }
    if args.context:
        from qwen35_ray.bench.offline_context import ratios, run

        report["bench"] = "offline-context"
        report["results"] = run(path, args.context, args.context_batch, args.dtype)
        report["longest_over_shortest"] = ratios(report["results"])
        for b, r in report["longest_over_shortest"].items():
            print(f"batch {b}: {max(args.context)} over {min(args.context)} tokens: x{r:.2f}")
        write_report(args.out, report)
        return 0
    if args.images:
        from qwen35_ray.bench.offline_images import run as run_images

        report["bench"] = "offline-images"
        num_prompts, new_tokens = args.num_prompts or 16, args.new_tokens or 16
        report.update(num_prompts=num_prompts, new_tokens=new_tokens)
        report.update(
            run_images(
                path,
                args.images,
                args.image_size,
                args.concurrency,
                num_prompts,
                new_tokens,
                args.dtype,
                text=not args.no_text,
            )
        )
        write_report(args.out, report)
        return 0
    if args.speculative:
        from qwen35_ray.bench.offline_spec import from_args

        return from_args(args, path, report)
    args.num_prompts, args.new_tokens = args.num_prompts or 64, args.new_tokens or 128
    vocab = ModelConfig.from_hf(path).vocab_size
    prompts = workload(args.num_prompts, vocab)
    results = []
    for c in args.concurrency:
        # at concurrency 1 the same prompts, fewer of them, keep the run short
        subset = prompts if c > 1 else prompts[: max(1, args.num_prompts // 16)]
        row = {"concurrency": c, "num_prompts": len(subset), "new_tokens": args.new_tokens}
        print(f"[bench offline] ours, concurrency {c}, {len(subset)} prompts ...", flush=True)
        row["ours"] = run_ours(path, subset, args.new_tokens, c, args.dtype)
        if not args.no_eager:
            print(
                f"[bench offline] ours with compile_decode=False, concurrency {c} ...", flush=True
            )
            row["ours_eager"] = run_ours(
                path, subset, args.new_tokens, c, args.dtype, compile_decode=False
            )
        if not args.skip_transformers:
            print(f"[bench offline] transformers, concurrency {c} ...", flush=True)
            row["transformers"] = run_transformers(path, subset, args.new_tokens, c, args.dtype)
            hf = row["transformers"]["tokens_per_s"]
            row["speedup"] = row["ours"]["tokens_per_s"] / hf
            if "ours_eager" in row:
                row["speedup_eager"] = row["ours_eager"]["tokens_per_s"] / hf
        results.append(row)
        print(_line(row), flush=True)
    report["results"] = results
    write_report(args.out, report)
    return 0


def _line(row: dict) -> str:
    ours = row["ours"]
    text = (
        f"concurrency {row['concurrency']:>3}: ours {ours['tokens_per_s']:8.1f} tok/s "
        f"(+{ours['peak_extra_mib']:.0f} MiB, start-up {ours['startup_s']:.0f} s"
        f"{'' if ours['compiled'] else ', not compiled'})"
    )
    if "ours_eager" in row:
        eager = row["ours_eager"]
        text += f", eager {eager['tokens_per_s']:8.1f} tok/s (+{eager['peak_extra_mib']:.0f} MiB)"
    if "transformers" in row:
        hf = row["transformers"]
        text += (
            f", transformers {hf['tokens_per_s']:8.1f} tok/s "
            f"(+{hf['peak_extra_mib']:.0f} MiB), x{row['speedup']:.2f}"
        )
        if "speedup_eager" in row:
            text += f" (eager x{row['speedup_eager']:.2f})"
    return text
