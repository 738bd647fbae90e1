"""The speculative-decoding flags of `qwen35-ray serve` -> EngineArgs.speculative.

vLLM: `--speculative-config '{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}'`.
SGLang: `--speculative-algorithm NEXTN --speculative-num-steps 2 [--speculative-eagle-topk 1
--speculative-num-draft-tokens 3]`. Both mean the checkpoint's own MTP head drafting one chain
of k tokens a step (docs/mtp.md); anything else (another method, a tree of drafts, expert
parallelism) is refused naming the flag.
"""

import argparse
import json

from qwen35_ray.engine.speculative import MAX_SPECULATIVE_TOKENS, MTP_METHODS, SpeculativeConfig

# SGLang's algorithms that mean the checkpoint's own MTP head (NEXTN; MTP in newer releases)
SGLANG_MTP = ("NEXTN", "MTP")
RANK_FLAGS = "-tp / --ep-size / --enable-expert-parallel"


def speculative_flags(a: argparse.Namespace, ranks: int) -> tuple[dict | None, list[str]]:
    """(EngineArgs.speculative or None, the errors, each naming its flag). ranks: of a
    replica, from the parallelism flags."""
    sglang = {
        "--speculative-num-steps": a.spec_steps,
        "--speculative-eagle-topk": a.spec_topk,
        "--speculative-num-draft-tokens": a.spec_draft_tokens,
    }
    given = [flag for flag, v in sglang.items() if v is not None]
    if a.speculative_config is not None:
        flag = "--speculative-config"
        if a.spec_algo is not None or given:
            return None, [
                f"{flag} is vLLM's spelling of {', '.join(['--speculative-algorithm', *given])}"
                f" (SGLang's); give one of them"
            ]
        spec, errors = _vllm(a.speculative_config)
    elif a.spec_algo is not None:
        flag = "--speculative-algorithm"
        spec, errors = _sglang(a.spec_algo, a.spec_steps, a.spec_topk, a.spec_draft_tokens)
    elif given:
        return None, [f"{given[0]} needs --speculative-algorithm NEXTN"]
    else:
        return None, []
    if spec is not None and ranks > 1:
        errors.append(
            f"{flag} with {ranks} expert-parallel ranks per replica ({RANK_FLAGS}): MTP "
            "speculative decoding needs expert_parallel_size 1, as the MTP layer's experts are "
            f"not sharded across ranks; drop {flag} or the rank flags (--num-replicas gives "
            "more engines)"
        )
    return (spec if not errors else None), errors


def _vllm(text: str) -> tuple[dict | None, list[str]]:
    flag = "--speculative-config"
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [f"{flag} is not JSON ({e.msg})"]
    if not isinstance(spec, dict):
        return None, [
            f"{flag} must be a JSON object like "
            '\'{"method": "qwen3_next_mtp", "num_speculative_tokens": 2}\''
        ]
    method = spec.get("method", "mtp")
    if not isinstance(method, str) or method.lower() not in MTP_METHODS:
        return None, [
            f"{flag}: speculative method {method!r} is not supported: the drafts come from the "
            f"checkpoint's own MTP head (method {', '.join(MTP_METHODS)})"
        ]
    try:
        cfg = SpeculativeConfig.parse({**spec, "method": "mtp"})
    except ValueError as e:
        return None, [f"{flag}: {str(e).removeprefix('speculative: ')}"]
    return {"method": "mtp", "num_speculative_tokens": cfg.k}, []


def _sglang(algo: str, steps, topk, draft) -> tuple[dict | None, list[str]]:
    if algo.upper() not in SGLANG_MTP:
        return None, [
            f"--speculative-algorithm {algo} is not supported: the drafts come from the "
            "checkpoint's own MTP head; pass --speculative-algorithm NEXTN"
        ]
    errors = []
    most = MAX_SPECULATIVE_TOKENS
    if steps is not None:
        k = steps
        if not 1 <= k <= most:
            errors.append(f"--speculative-num-steps {steps} must be from 1 to {most}")
    elif draft is not None:
        # SGLang's draft tokens count the verified token with the chain's drafts
        k = draft - 1
        if not 1 <= k <= most:
            errors.append(
                f"--speculative-num-draft-tokens {draft} must be from 2 to {most + 1} (the "
                "drafts and the token they follow)"
            )
    else:
        k = None
        errors.append(
            f"--speculative-algorithm {algo} needs --speculative-num-steps N: the MTP head's "
            f"drafts verified per step, 1 to {most}"
        )
    if topk not in (None, 1):
        errors.append(
            f"--speculative-eagle-topk {topk} asks for a tree of drafts; the MTP head drafts one "
            "chain here: pass --speculative-eagle-topk 1 or leave it out"
        )
    if steps is not None and draft is not None and draft != steps + 1:
        errors.append(
            f"--speculative-num-draft-tokens {draft} with --speculative-num-steps {steps}: a "
            f"chain of {steps} drafts verifies {steps + 1} tokens; pass "
            f"--speculative-num-draft-tokens {steps + 1} or leave it out"
        )
    if errors:
        return None, errors
    return {"method": "mtp", "num_speculative_tokens": k}, []
