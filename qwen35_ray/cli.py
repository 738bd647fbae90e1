"""The `qwen35-ray` command line."""

import argparse
import importlib
import logging
import sys
from pathlib import Path


def _make_tiny(args: argparse.Namespace) -> int:
    from qwen35_ray.model.tiny.checkpoint import write_tiny

    out = write_tiny(Path(args.dir), dense=args.dense)
    print(f"wrote {'qwen35-tiny-dense' if args.dense else 'qwen35-tiny'} to {out}")
    return 0


def _distill_mtp(args: argparse.Namespace) -> int:
    import json

    from qwen35_ray.model.mtp_distill import DistillConfig, distill_mtp

    cfg = DistillConfig(
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        train_sequences=args.train_sequences,
        chain_mix=args.chain_mix,
    )
    report = distill_mtp(args.model, Path(args.out_dir), cfg)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out_dir}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import json

    from qwen35_ray import LLM

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    overrides = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    params = llm.engine.default_sampling_params(max_tokens=args.max_tokens, **overrides)
    prompt = args.prompt
    if args.chat:
        prompt = llm.get_tokenizer().apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    out = llm.generate(prompt, params)[0]
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": out.prompt,
                    "prompt_token_ids": out.prompt_token_ids,
                    "outputs": [
                        {
                            "index": o.index,
                            "text": o.text,
                            "token_ids": o.token_ids,
                            "finish_reason": o.finish_reason,
                        }
                        for o in out.outputs
                    ],
                }
            )
        )
    else:
        for o in out.outputs:
            print(o.text)
    return 0


SAMPLING_FLAGS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _chat(args: argparse.Namespace) -> int:
    """An interactive terminal chat through the model's chat template; /reset, /exit."""
    from qwen35_ray import LLM
    from qwen35_ray.serving.parsers import ReasoningParser, prompt_ends_in_reasoning

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    tok = llm.get_tokenizer()
    params = llm.engine.default_sampling_params(max_tokens=args.max_tokens)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("qwen35-ray chat: type a message; /reset clears the conversation, /exit quits.")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=not args.no_thinking,
        )
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        engine = llm.engine
        rid = f"chat-{len(messages)}"
        engine.add_request(rid, ids, params)
        text = ""
        while engine.has_unfinished():
            for out in engine.step():
                new = out.outputs[0].text[len(text) :]
                text = out.outputs[0].text
                print(new, end="", flush=True)
        print()
        _, answer = ReasoningParser(prompt_ends_in_reasoning(prompt)).parse(text)
        messages.append({"role": "assistant", "content": answer or ""})


def _bench(args: argparse.Namespace) -> int:
    if args.what == "offline":
        from qwen35_ray.bench.offline import main as bench
    elif args.what == "structured":
        from qwen35_ray.bench.structured import main as bench
    elif args.what == "ep":
        from qwen35_ray.bench.ep import main as bench
    elif args.what == "autoscale":
        from qwen35_ray.bench.autoscale import main as bench
    elif args.what == "serve":
        from qwen35_ray.bench.serve import main as bench
    elif args.what == "sampler":
        from qwen35_ray.bench.sampler import main as bench
    else:
        from qwen35_ray.bench.kernels import main as bench
    return bench(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write the embedded tiny Qwen3.5 checkpoint to DIR")
    tiny.add_argument("dir", help="output directory (created if missing)")
    tiny.add_argument("--dense", action="store_true", help="the dense variant (no MoE)")
    tiny.set_defaults(func=_make_tiny)

    distill = sub.add_parser(
        "distill-mtp",
        help="copy a checkpoint to OUT_DIR with its MTP head trained on the main model's own "
        "greedy continuations (docs/mtp.md)",
    )
    distill.add_argument("out_dir", help="output directory (created if missing)")
    distill.add_argument("--model", default="qwen35-tiny", help="source (default qwen35-tiny)")
    distill.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    distill.add_argument(
        "--train-sequences",
        type=int,
        default=256,
        help="greedy continuations to train on (default 256; 64 more are held out)",
    )
    distill.add_argument(
        "--chain-mix",
        type=float,
        default=None,
        help="first make the main model mostly follow a random token chain, its layers' "
        "outputs scaled by this (0..1; 0.12 follows it at most positions), so that drafts "
        "can be learned (a synthetic checkpoint; docs/mtp.md)",
    )
    distill.set_defaults(func=_distill_mtp)

    gen = sub.add_parser("generate", help="complete one prompt with the offline engine")
    gen.add_argument(
        "--model",
        default="qwen35-tiny",
        help="embedded name, checkpoint directory or hub id (default qwen35-tiny)",
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--max-tokens", type=int, default=64)
    for flag in SAMPLING_FLAGS:
        kind = int if flag in ("top_k", "seed", "n") else float
        gen.add_argument(
            "--" + flag.replace("_", "-"),
            type=kind,
            default=None,
            help="default: the model's generation_config.json",
        )
    gen.add_argument("--json", action="store_true", help="print the output as JSON")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--model", default="qwen35-tiny")
    chat.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    chat.add_argument("--max-model-len", type=int, default=None)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--no-thinking", action="store_true", help="enable_thinking=False")
    chat.set_defaults(func=_chat)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: `bench offline -h`, `bench kernels -h`, `bench structured -h`, "
        "`bench ep -h`, `bench autoscale -h`, `bench serve -h`, `bench sampler -h`",
    )
    bench.add_argument(
        "what", choices=["offline", "kernels", "structured", "ep", "autoscale", "serve", "sampler"]
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=_bench)
    for name, (_, text) in DELEGATED.items():
        # listed for --help; main() hands their arguments to their own parsers
        sub.add_parser(name, help=text, add_help=False)
    return parser


# commands with parsers of their own: name -> (module with main(argv), help)
DELEGATED = {
    "plan": (
        "qwen35_ray.deploy.plan",
        "size a deployment from a model config and the hardware; writes a Serve YAML and a "
        "RayService (`plan -h`)",
    ),
    "k8s": (
        "qwen35_ray.deploy.k8s_samples",
        "render the KubeRay manifests in k8s/ from deployments/ (`k8s render -h`)",
    ),
    "serve": (
        "qwen35_ray.deploy.serve_flags",
        "serve MODEL on Ray Serve from vLLM's or SGLang's flags; --print-config writes the "
        "Serve YAML (`serve -h`)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
