"""A speculative step of greedy verify rows only, as one forward (model/greedy_spec.py).

At low concurrency almost every step is this one: each running sequence verifies its last
token and k drafts, no prompt chunk runs with them, and every request is plain greedy (no
logprobs, bias, penalty, grammar or thinking budget: spec_accept.draft_mode). Then the
verify, the acceptance, the head's pass and its k drafts are one graph call and one store,
where the general step (engine/spec_step.py) takes k + 1 graph calls with the acceptance and
the drafting in Python between them. What it emits is the same, token for token: greedy
sampling is the argmax of the same logits.

On a CPU cache with DecodeKV copies (the torch kernels) only; elsewhere, and for any other
step, the general path runs.
"""

import torch

from qwen35_ray.engine.errors import EngineDead
from qwen35_ray.engine.executor import StepBatch, StepResult
from qwen35_ray.engine.spec_accept import draft_mode
from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.greedy_spec import greedy_spec, greedy_spec_inputs, store_greedy_spec
from qwen35_ray.model.slot_verify import slot_verifies


def greedy_only(batch: StepBatch) -> bool:
    """The step is verify rows of plain greedy requests, nothing else."""
    spec = batch.spec
    if spec.num_prompt_chunks or batch.masks is not None or batch.embeds:
        return False
    if len(batch.sampling) != len(batch.chunks) or not all(spec.keeps):
        return False
    return all(r.forced is None and draft_mode(r.params) == "greedy" for r in batch.rows)


def run_greedy(runner, batch: StepBatch, vb: ForwardBatch) -> StepResult:
    """The step's tokens: each row's first emitted token (StepResult.tokens), the kept ones
    after it (.more) and the head's k drafts for its next step (.drafts)."""
    model, cache = runner.model, runner.cache
    width = batch.spec.k + 1
    try:
        ids = torch.tensor(batch.input_ids, device=runner.device)
        inputs = greedy_spec_inputs(vb, cache, len(model.config.attention_layers), width)
        compiled = runner.compiled_verify
        if compiled is not None and compiled.ready:
            target, kept, drafts, *states = compiled.greedy(ids, *inputs)
        else:
            target, kept, drafts, *states = greedy_spec(model, width, ids, *inputs)
        if (load := getattr(model, "expert_load", None)) is not None:
            load.end_step()
        kept = kept.tolist()
        store_greedy_spec(vb, cache, states, kept)
    except Exception as e:
        n = len(batch.chunks)
        raise EngineDead(f"the model failed in a speculative step of {n} rows") from e
    target, drafts = target.tolist(), drafts.tolist()
    result = StepResult({i: (target[j][0], None) for j, i in enumerate(batch.sampling)})
    for j, (i, a) in enumerate(zip(batch.sampling, kept)):
        if a > 1:
            result.more[i] = target[j][1:a]
        result.drafts[i] = drafts[j]
    return result


def try_greedy(runner, batch: StepBatch) -> StepResult | None:
    """run_greedy's result when the step is one it runs, else None."""
    if not greedy_only(batch):
        return None
    vb = ForwardBatch.build(batch.chunks, runner.cache.block_size, runner.device)
    if not slot_verifies(vb, runner.cache):
        return None
    return run_greedy(runner, batch, vb)
