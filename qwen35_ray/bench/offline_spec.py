"""`qwen35-ray bench offline --speculative 0 1 2 3`: output tokens/s with MTP speculative
decoding at each k (0: off) side by side, and what the drafts did: drafts, accepted tokens,
mean accept length (1 + accepted / drafts: tokens a verify row gives) and the acceptance rate at
each draft position (accepted_per_pos[i] / drafts), from the engine's counters
(engine/spec_stats.py) read before and after each run.

One engine per variant, all built first (a background compile waited for), then runs
interleaved: per concurrency, every repeat runs each variant once in turn, the order rotated by
one each repeat, so a noisy host slows all of them alike rather than the one that ran during
the noise. Every variant is the default engine but for its k (on CPU: the decode step, or with
speculative the verify and MTP steps, compiled; engine/verify_graph.py), and k = 0 runs a
second time with compile_decode=False, the eager step, so a gain of the compiled graphs is not
taken for one of the drafts; `compiled` in the report says which engines ran compiled. Every
concurrency runs all the prompts (the plain bench runs a sixteenth of them at concurrency 1:
too few drafts to count). Each engine first runs the concurrency's prompts once with 2 new
tokens, not counted.

Requests are greedy by default (--temperature for sampled ones, which keep drafts by rejection
sampling: engine/spec_accept.py). Prompts are the ordinary tokens of the tokenizer (no added or
special tokens), so that on a chain checkpoint (`distill-mtp --chain-mix`, docs/mtp.md) every
prompt token is one of the chain's. Each run counts the prompts whose output is the first
variant's (same_outputs): greedy speculative decoding is exact, so a mismatch means a bug (or,
between the compiled and the eager step, a near tie broken differently).
"""

import statistics
import sys
import time

# load_stats() counters read as deltas over a run
COUNTERS = (
    "spec_decode_num_drafts_total",
    "spec_decode_num_draft_tokens_total",
    "spec_decode_num_accepted_tokens_total",
    "decode_steps_total",
    "decode_step_seconds_total",
)
PER_POS = "spec_decode_num_accepted_tokens_per_pos"


def from_args(args, path, report: dict) -> int:
    """`bench offline --speculative ...`: checks its options, runs, writes the report."""
    from qwen35_ray.bench.timing import write_report
    from qwen35_ray.engine.speculative import MAX_SPECULATIVE_TOKENS as MAX_K

    if not all(0 <= k <= MAX_K for k in args.speculative):
        raise SystemExit(f"--speculative {args.speculative}: each K from 0 (off) to {MAX_K}")
    if args.repeats < 1 or not 1 <= args.input_len[0] <= args.input_len[1]:
        raise SystemExit("--repeats must be >= 1 and --input-len MIN MAX with 1 <= MIN <= MAX")
    report["bench"] = "offline-speculative"
    num_prompts, new_tokens = args.num_prompts or 32, args.new_tokens or 64
    report.update(num_prompts=num_prompts, new_tokens=new_tokens, input_len=args.input_len)
    report.update(
        run(
            path,
            args.speculative,
            args.concurrency,
            num_prompts,
            new_tokens,
            tuple(args.input_len),
            args.dtype,
            repeats=args.repeats,
            eager=not args.no_eager,
            temperature=args.temperature,
        )
    )
    write_report(args.out, report)
    return 0


def variants(ks: list[int], eager: bool = True) -> list[tuple[str, dict]]:
    """(name, engine settings) per variant: k = 0 as the default engine and, with eager, with
    compile_decode=False; k > 0 with speculative decoding of k drafts."""
    out = []
    for k in dict.fromkeys(ks):
        if k == 0:
            out.append(("k=0", {}))
            if eager:
                out.append(("k=0 eager", {"compile_decode": False}))
        else:
            spec = {"method": "mtp", "num_speculative_tokens": k}
            out.append((f"k={k}", {"speculative": spec}))
    return out


def prompts(path, num_prompts: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """Random prompts of lengths[0] to lengths[1] ordinary tokens, fixed by the seed."""
    from qwen35_ray.bench.offline import workload
    from qwen35_ray.model.mtp_distill import ordinary_token_ids

    ids = ordinary_token_ids(path)
    return workload(num_prompts, len(ids), seed, lengths, ids)


def run_prompts(engine, prompts, new_tokens: int, concurrency: int, temperature: float) -> dict:
    """The prompts through the engine, `concurrency` in flight (a new one added as one
    finishes), new_tokens each; its time, outputs and counter deltas."""
    from qwen35_ray.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True)
    before = engine.load_stats()
    todo = list(enumerate(prompts))[::-1]
    outputs: dict[int, list[int]] = {}
    running = 0
    start = time.perf_counter()
    while todo or running:
        while todo and running < concurrency:
            i, ids = todo.pop()
            engine.add_request(str(i), ids, params)
            running += 1
        for out in engine.step():
            if out.error is not None:
                raise out.error
            if out.finished:
                outputs[int(out.request_id)] = list(out.outputs[0].token_ids)
                running -= 1
    seconds = time.perf_counter() - start
    after = engine.load_stats()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    per_pos = [a - b for a, b in zip(after.get(PER_POS, []), before.get(PER_POS, []))]
    generated = sum(map(len, outputs.values()))
    steps = delta["decode_steps_total"]
    row = {
        "num_prompts": len(prompts),
        "seconds": seconds,
        "output_tokens": generated,
        "output_tokens_per_s": generated / seconds,
        "decode_steps": steps,
        "decode_step_ms": 1e3 * delta["decode_step_seconds_total"] / steps if steps else None,
        "outputs": [outputs[i] for i in range(len(prompts))],
    }
    if PER_POS in after:
        drafts = delta["spec_decode_num_drafts_total"]
        draft_tokens = delta["spec_decode_num_draft_tokens_total"]
        accepted = delta["spec_decode_num_accepted_tokens_total"]
        row.update(spec_summary(drafts, draft_tokens, accepted, per_pos))
    return row


def spec_summary(drafts: int, draft_tokens: int, accepted: int, per_pos: list[int]) -> dict:
    """vLLM's derived numbers: mean accept length, acceptance overall and per position."""
    return {
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted": accepted,
        "accepted_per_pos": per_pos,
        "mean_accept_length": 1 + accepted / drafts if drafts else None,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "acceptance_per_pos": [a / drafts for a in per_pos] if drafts else None,
    }


def run(
    path,
    ks: list[int],
    concurrencies: list[int],
    num_prompts: int,
    new_tokens: int,
    lengths: tuple[int, int],
    dtype: str,
    repeats: int = 1,
    eager: bool = True,
    temperature: float = 0.0,
) -> dict:
    """Every variant at every concurrency, `repeats` interleaved runs each: the runs, and a
    row per (concurrency, variant) with the median tokens/s and the counters summed."""
    from qwen35_ray.engine.llm_engine import LLMEngine

    todo = variants(ks, eager)
    engines, startup, compiled = {}, {}, {}
    for name, settings in todo:
        progress(f"building the engine {name} ...")
        start = time.perf_counter()
        engine = LLMEngine.from_pretrained(str(path), dtype=dtype, **settings)
        # start-up counts until decode steps run at full speed, a background compile included
        compiled[name] = engine.executor.wait_compiled()
        engines[name], startup[name] = engine, time.perf_counter() - start
    work = prompts(path, num_prompts, lengths)
    runs, rows = [], []
    for c in concurrencies:
        for name, _ in todo:
            run_prompts(engines[name], work, 2, c, temperature)
        reference = None
        for r in range(repeats):
            order = todo[r % len(todo) :] + todo[: r % len(todo)]
            for name, _ in order:
                progress(f"{name}, concurrency {c}, repeat {r + 1}/{repeats} ...")
                result = run_prompts(engines[name], work, new_tokens, c, temperature)
                outputs = result.pop("outputs")
                reference = reference or outputs
                # sampled outputs differ by design; greedy ones must not
                same = sum(map(list.__eq__, outputs, reference)) if not temperature else None
                runs.append({"variant": name, "concurrency": c, "repeat": r, **result})
                runs[-1]["same_outputs"] = same
        mine = [x for x in runs if x["concurrency"] == c]
        here = [summarize(n, s, c, [x for x in mine if x["variant"] == n]) for n, s in todo]
        add_speedups(here)
        for row in here:
            row["compiled"] = compiled[row["variant"]]
            print(spec_line(row), flush=True)
        rows += here
    for engine in engines.values():
        engine.shutdown()
    return {
        "startup_s": startup,
        "compiled": compiled,
        "engine_settings": dict(todo),
        "temperature": temperature,
        "results": rows,
        "runs": runs,
    }


def summarize(name: str, settings: dict, concurrency: int, runs: list[dict]) -> dict:
    spec = settings.get("speculative")
    row = {
        "variant": name,
        "k": spec["num_speculative_tokens"] if spec else 0,
        "compile_decode": settings.get("compile_decode"),
        "concurrency": concurrency,
        "repeats": len(runs),
        "output_tokens_per_s": statistics.median(x["output_tokens_per_s"] for x in runs),
        "output_tokens_per_s_runs": [x["output_tokens_per_s"] for x in runs],
        "decode_step_ms": statistics.median(x["decode_step_ms"] or 0.0 for x in runs),
        "num_prompts": runs[0]["num_prompts"],
        "output_tokens": runs[0]["output_tokens"],
    }
    # prompts whose output equals the first variant's in every repeat (None: sampled)
    same = [x["same_outputs"] for x in runs]
    row["same_outputs"] = None if None in same else min(same)
    if spec:
        total = {key: sum(x[key] for x in runs) for key in ("drafts", "draft_tokens", "accepted")}
        per_pos = [sum(col) for col in zip(*(x["accepted_per_pos"] for x in runs))]
        row.update(spec_summary(total["drafts"], total["draft_tokens"], total["accepted"], per_pos))
    return row


def add_speedups(rows: list[dict]) -> None:
    """Each row's median tokens/s over k = 0's default and eager runs at its concurrency, and
    (speedup_paired) the median of its runs' ratios to k = 0's run of the same repeat: runs of
    one repeat are seconds apart, so a host whose speed drifts over minutes moves both."""
    base = {row["variant"]: row for row in rows}
    for row in rows:
        for key, ref in (("speedup", "k=0"), ("speedup_over_eager", "k=0 eager")):
            if ref in base:
                row[key] = row["output_tokens_per_s"] / base[ref]["output_tokens_per_s"]
        if "k=0" in base:
            pairs = zip(row["output_tokens_per_s_runs"], base["k=0"]["output_tokens_per_s_runs"])
            row["speedup_paired"] = statistics.median(a / b for a, b in pairs)


def progress(text: str) -> None:
    print(f"[bench offline] {text}", file=sys.stderr, flush=True)


def spec_line(row: dict) -> str:
    text = (
        f"concurrency {row['concurrency']:>3} {row['variant']:<10} "
        f"{row['output_tokens_per_s']:8.1f} tok/s"
    )
    if row["compile_decode"] is None and not row["compiled"]:
        text += " (not compiled)"
    if "speedup" in row:
        text += f" x{row['speedup']:.2f} (paired x{row['speedup_paired']:.2f})"
    if "speedup_over_eager" in row:
        text += f" (x{row['speedup_over_eager']:.2f} over eager)"
    text += f", {row['decode_step_ms']:.1f} ms a decode step"
    if row.get("mean_accept_length") is not None:
        per_pos = " ".join(f"{a:.2f}" for a in row["acceptance_per_pos"])
        text += f", accept length {row['mean_accept_length']:.2f}, per position {per_pos}"
    return text
