"""`qwen35-ray bench structured`: the cost of constrained decoding. The same concurrent
requests through the offline engine, free and under a JSON schema; tokens/s of each, ratio.

The schema (an array of at least 40 small objects) is longer than --new-tokens, so constrained
sequences run to max_tokens like the free ones and both modes decode the same token counts at
the same batch size: the difference is the grammar's mask, filled and applied every step.
Modes alternate over --repeats rounds; the median of each is reported (a shared host is noisy).
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": {"type": "string", "maxLength": 8},
            "kind": {"enum": ["tool", "food", "place"]},
            "ok": {"type": "boolean"},
        },
        "required": ["id", "name", "kind", "ok"],
        "additionalProperties": False,
    },
}


def run(engine, prompts, new_tokens, structured) -> dict:
    from qwen35_ray.engine.sampling_params import SamplingParams

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        params = SamplingParams(
            temperature=1.0, seed=i, max_tokens=new_tokens, ignore_eos=True, structured=structured
        )
        engine.add_request(f"{time.perf_counter_ns()}-{i}", ids, params)
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens += sum(len(o.token_ids) for o in out.outputs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    from qwen35_ray.bench.timing import machine_info, write_report
    from qwen35_ray.engine.llm_engine import LLMEngine

    p = argparse.ArgumentParser(prog="qwen35-ray bench structured", description=__doc__)
    p.add_argument("--model", default="qwen35-tiny")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    engine = LLMEngine.from_pretrained(
        args.model, dtype=args.dtype, max_num_seqs=args.concurrency, enable_prefix_caching=False
    )
    gen = torch.Generator().manual_seed(0)
    vocab = len(engine.tokenizer)
    prompts = [
        torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist()
        for _ in range(args.concurrency)
    ]
    spec = {"type": "json_schema", "schema": SCHEMA}
    # warm-up at full batch, outside the timing: first-call paths, the vocabulary and schema
    # compiles
    run(engine, prompts, 8, None)
    run(engine, prompts, 8, spec)
    rounds = {"free": [], "json_schema": []}
    for r in range(args.repeats):
        for mode, structured in (("free", None), ("json_schema", spec)):
            result = run(engine, prompts, args.new_tokens, structured)
            rounds[mode].append(result)
            print(
                f"[bench structured] round {r} {mode}: {result['tokens_per_s']:.1f} tok/s",
                flush=True,
            )
    median = {m: statistics.median(x["tokens_per_s"] for x in rs) for m, rs in rounds.items()}
    ratio = median["json_schema"] / median["free"]
    print(
        f"concurrency {args.concurrency}: free {median['free']:.1f} tok/s, json_schema "
        f"{median['json_schema']:.1f} tok/s, ratio {ratio:.3f}"
    )
    report = {
        "bench": "structured",
        "model": args.model,
        "dtype": args.dtype,
        "machine": machine_info("cpu"),
        "concurrency": args.concurrency,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "schema": SCHEMA,
        "rounds": rounds,
        "median_tokens_per_s": median,
        "ratio": ratio,
        "command": "qwen35-ray bench structured " + " ".join(argv or []),
    }
    write_report(args.out, report)
    return 0
