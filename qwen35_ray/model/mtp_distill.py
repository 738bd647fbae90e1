"""Distil a checkpoint's MTP head from its own main model, so that draft acceptance means
something on a random-weight checkpoint (issue 22, MTP speculative decoding).

The main model is frozen. It greedily continues seeded random prompts (ordinary token ids of
the checkpoint's tokenizer); one teacher-forced pass over each whole sequence then gives its
final hidden states and next-token distributions. The MTP head is trained on those sequences
with teacher forcing: at position t it reads the main model's hidden state at t and the
embedding of token t+1, and its logits (through the main model's lm_head) are pulled towards
the main model's own distribution at t+1, which is what it must draft, the token at t+2
(KL(main || head), the main model's full distribution rather than only its argmax).

The hidden state the head reads is the main model's output after its final RMSNorm, as in
vLLM: Qwen3NextModel.forward (vllm/model_executor/models/qwen3_next.py) returns
`self.norm(hidden_states, residual)`, and that output is what Qwen3NextMultiTokenPredictor
(qwen3_next_mtp.py) takes as `hidden_states` and passes through pre_fc_norm_hidden. Our
Qwen35ForCausalLM.hidden_states returns the same (after `self.norm`).

Training runs the head's own modules (MultiTokenPredictor.forward) with a `SequenceStep` in
place of the engine's PagedStep: the same rope and causal attention over each whole sequence,
without the paged cache, so autograd sees plain tensors. tests/model/test_mtp_distill.py checks
that it gives the engine's mtp_forward outputs. Everything runs in fp32 on CPU with a fixed
seed, thread count and torch.use_deterministic_algorithms: the same arguments on the same
machine give the same bytes. Only `mtp.*` tensors change in the written checkpoint; they are
saved in the source tensors' dtype.

Acceptance here is the top-1 agreement of the head's draft for token t+2 with the token the
main model chose greedily at t+2, over the generated part of held-out sequences: the rate at
which speculative decoding with one MTP draft token would accept the draft under greedy
sampling. On qwen35-tiny it stays near chance after distillation (docs/mtp.md has the measured
numbers): the random main model's next-token distribution is nearly uniform and its greedy
continuations do not repeat, so its argmax at t+1 is not learnable by one layer in minutes.
With chain_mix (model/mtp_chain.py) the main model first becomes one that mostly follows a
random token chain, and acceptance reaches what that share allows (0.79 at 0.12).
"""

import contextlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from qwen35_kernels.rope import apply_rope
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mtp_chain import chain_checkpoint, follows
from qwen35_ray.model.qwen35 import Qwen35ForCausalLM
from qwen35_ray.model.source import resolve_model
from qwen35_ray.model.weights import checkpoint_files

BLOCK = 16
REPORT = "distill_report.json"


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 300
    seed: int = 0
    threads: int = 2
    train_sequences: int = 256
    eval_sequences: int = 64
    prompt_len: int = 16
    new_tokens: int = 112  # greedy tokens after each prompt
    batch_sequences: int = 16  # whole sequences per training step
    lr: float = 3e-3
    log_every: int = 25
    # None: distil from the model as it is; a number: first make its main model follow a
    # random token chain, its layers' outputs scaled by this (model/mtp_chain.py)
    chain_mix: float | None = None


class SequenceStep:
    """The step the MTP layer trains in: B sequences of L tokens each, flat [B * L] in
    sequence order, each from position 0. Rope at each token's index; causal attention within
    each sequence over the step's own K/V (no cache, differentiable)."""

    def __init__(self, num_seqs: int, seq_len: int):
        self.B, self.L = num_seqs, seq_len
        self.positions = torch.arange(seq_len).repeat(num_seqs)

    def rope(self, x: torch.Tensor, inv_freq, scale: float, mrope_section) -> torch.Tensor:
        return apply_rope(x, self.positions, inv_freq, scale)

    def attention(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        B, L = self.B, self.L
        per_seq = lambda x: x.view(B, L, *x.shape[1:]).transpose(1, 2)  # [B, heads, L, D]
        o = F.scaled_dot_product_attention(
            per_seq(q), per_seq(k), per_seq(v), is_causal=True, scale=scale, enable_gqa=True
        )
        return o.transpose(1, 2).reshape(q.shape)

    def conv(self, *args):
        # only the MTP layer runs in this step, and it is a full-attention layer
        raise RuntimeError("SequenceStep runs the MTP layer only, which has no GDN mixer")

    delta_rule = conv


def mtp_train_forward(
    model: Qwen35ForCausalLM,
    hidden: torch.Tensor,  # [B, L, H] the main model's final hidden states
    next_ids: torch.Tensor,  # [B, L] the token after each position
) -> torch.Tensor:
    """The MTP head's draft hidden states [B, L, H] over whole sequences, differentiable in
    the head's parameters; equal to what mtp_forward gives after a prefill of the sequences."""
    B, L, H = hidden.shape
    embeds = model.embed_tokens(next_ids.reshape(-1))
    return model.mtp(embeds, hidden.reshape(-1, H), SequenceStep(B, L)).view(B, L, H)


def prefill(model: Qwen35ForCausalLM, seqs: torch.Tensor, with_mtp: bool = False):
    """One teacher-forced pass of the main model over seqs [N, L] from position 0:
    (hidden [N, L, H], batch, cache); the cache has room for the MTP layer's K/V if asked."""
    N, L = seqs.shape
    config = model.config
    per_seq = -(-L // BLOCK)
    dtype = next(model.parameters()).dtype
    cache = HybridCache.allocate(config, N, N * per_seq, BLOCK, dtype, with_mtp=with_mtp)
    chunks = [SeqChunk(0, L, i, list(range(i * per_seq, (i + 1) * per_seq))) for i in range(N)]
    batch = ForwardBatch.build(chunks, BLOCK)
    hidden = model(seqs.reshape(-1), batch, cache)
    return hidden.view(N, L, -1), batch, cache


def greedy_continuations(
    model: Qwen35ForCausalLM, prompts: torch.Tensor, new_tokens: int, group: int = 64
) -> torch.Tensor:
    """prompts [N, P] followed by the main model's greedy tokens: [N, P + new_tokens]. In
    groups of sequences: the prompts of a group prefilled together, then one token per
    sequence per step."""
    parts = [prompts[i : i + group] for i in range(0, len(prompts), group)]
    return torch.cat([_greedy(model, p, new_tokens) for p in parts])


@torch.no_grad()
def _greedy(model: Qwen35ForCausalLM, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    N, P = prompts.shape
    total = P + new_tokens
    per_seq = -(-total // BLOCK)
    dtype = next(model.parameters()).dtype
    cache = HybridCache.allocate(model.config, N, N * per_seq, BLOCK, dtype)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(N)]
    batch = ForwardBatch.build([SeqChunk(0, P, i, tables[i]) for i in range(N)], BLOCK)
    hidden = model(prompts.reshape(-1), batch, cache)
    tokens = [prompts]
    last = model.compute_logits(hidden[batch.last_token_indices]).argmax(-1)
    for done in range(P, total):
        tokens.append(last[:, None])
        if done == total - 1:
            break
        batch = ForwardBatch.build([SeqChunk(done, 1, i, tables[i]) for i in range(N)], BLOCK)
        last = model.compute_logits(model(last, batch, cache)).argmax(-1)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def main_hidden(model: Qwen35ForCausalLM, seqs: torch.Tensor, group: int = 32) -> torch.Tensor:
    """The main model's final hidden states [N, L, H] over seqs [N, L], in groups."""
    return torch.cat([prefill(model, seqs[i : i + group])[0] for i in range(0, len(seqs), group)])


@torch.no_grad()
def acceptance(model: Qwen35ForCausalLM, seqs: torch.Tensor, prompt_len: int, group: int = 32):
    """Top-1 agreement of the MTP head's draft for token t+2 with seqs' token t+2 (the main
    model's greedy token) over t+2 >= prompt_len, with the engine's path: a prefill, then
    mtp_forward over the same batch. Returns (rate, positions counted)."""
    hits = count = 0
    for i in range(0, seqs.shape[0], group):
        part = seqs[i : i + group]
        N, L = part.shape
        hidden, batch, cache = prefill(model, part, with_mtp=True)
        # the last position has no next token: give it any, its draft is not counted
        next_ids = torch.cat([part[:, 1:], part[:, :1]], dim=1)
        draft = model.mtp_forward(next_ids.reshape(-1), hidden.reshape(N * L, -1), batch, cache)
        guess = model.compute_logits(draft).argmax(-1).view(N, L)[:, prompt_len - 2 : L - 2]
        truth = part[:, prompt_len:]
        hits += int((guess == truth).sum())
        count += truth.numel()
    return hits / count, count


@torch.no_grad()
def held_out_kl(model, hidden: torch.Tensor, seqs: torch.Tensor, prompt_len: int) -> float:
    """The training loss on other sequences: mean KL(main at t+1 || head at t) over the
    positions whose token t+1 is greedy."""
    first = prompt_len - 1
    target = model.compute_logits(hidden[:, first + 1 :]).log_softmax(-1)
    draft = mtp_train_forward(model, hidden[:, :-1], seqs[:, 1:])[:, first:]
    out = model.compute_logits(draft).log_softmax(-1)
    return F.kl_div(out, target, log_target=True, reduction="none").sum(-1).mean().item()


def ordinary_token_ids(path: Path) -> torch.Tensor:
    """Ids of the tokenizer's ordinary tokens (added and special tokens left out)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    added = set(tok.get_added_vocab().values())
    return torch.tensor([i for i in range(len(tok)) if i not in added])


@contextlib.contextmanager
def deterministic(seed: int, threads: int):
    """Fixed seed, thread count and deterministic algorithms; the settings restored after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _trainable_mtp(model: Qwen35ForCausalLM) -> list[torch.nn.Parameter]:
    """The MTP head's parameters as their own tensors with gradients, the fused projection
    buffers dropped (model/linear.py): `project` then multiplies by the parameters."""
    mtp = model.mtp
    for m in mtp.modules():
        for name, _ in list(m.named_buffers(recurse=False)):
            if name.endswith("_fused"):
                setattr(m, name, None)
    params = list(mtp.parameters())
    for p in params:
        p.data = p.data.clone()
        p.requires_grad_(True)
    return params


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_mtp(model, hidden, seqs, cfg: DistillConfig, gen: torch.Generator, evaluate=None):
    """Train model.mtp in place on sequences seqs [N, L] with the main model's hidden states
    hidden [N, L, H]: at t, KL(main at t+1 || head at t), counted where token t+1 is a
    greedy one (t + 1 >= prompt_len). The main model's distribution at t+1 is its lm_head
    over hidden[:, t+1]. evaluate: called every log_every steps for a held-out figure."""
    params = _trainable_mtp(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / cfg.steps)
    )
    N, L = seqs.shape
    first = cfg.prompt_len - 1  # the first t whose token t+1 is greedy
    model.mtp.train()
    for step in range(1, cfg.steps + 1):
        rows = torch.randperm(N, generator=gen)[: cfg.batch_sequences]
        with torch.no_grad():
            target = model.compute_logits(hidden[rows, first + 1 :]).log_softmax(-1)
        draft = mtp_train_forward(model, hidden[rows, :-1], seqs[rows, 1:])[:, first:]
        out = model.compute_logits(draft).log_softmax(-1)
        loss = F.kl_div(out, target, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % cfg.log_every == 0 or step == 1 or step == cfg.steps:
            agree = (out.argmax(-1) == target.argmax(-1)).float().mean().item()
            extra = "" if evaluate is None else f" held-out {evaluate():.3f}"
            _log(f"step {step}/{cfg.steps} kl {loss.item():.4f} top1 {agree:.3f}{extra}")
    model.mtp.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        for layer in model.mtp.layers:
            layer.fuse_projections()


def write_checkpoint(src: Path, out: Path, model: Qwen35ForCausalLM) -> None:
    """A copy of the checkpoint at src in out, its `mtp.*` tensors replaced by the model's
    (in the source tensors' dtype), every other tensor copied unchanged."""
    out.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(src)
    if len(files) != 1:
        raise ValueError(f"{src} has {len(files)} safetensors files; one is supported")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name != REPORT:
            shutil.copy2(f, out / f.name)
    trained = {f"mtp.{n}": p.detach() for n, p in model.mtp.named_parameters()}
    tensors = {}
    with safe_open(str(files[0]), "pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            t = f.get_tensor(name)
            if name.startswith("mtp."):
                if name not in trained or trained[name].shape != t.shape:
                    raise ValueError(f"{name} of {src} is not in the model's layout")
                t = trained.pop(name).to(t.dtype).contiguous()
            tensors[name] = t
    if trained:
        raise ValueError(f"{src} lacks {sorted(trained)[0]}")
    save_file(tensors, str(out / files[0].name), metadata=metadata)


def distill_mtp(model: str, out_dir: str | Path, cfg: DistillConfig = DistillConfig()) -> dict:
    """Distil the MTP head of `model` (embedded name, directory or hub id) and write the
    checkpoint with the trained head and distill_report.json to out_dir; returns the report."""
    start = time.perf_counter()
    out = Path(out_dir)
    source, chain_dir, f_of = model, None, None
    if cfg.chain_mix is not None:
        src = resolve_model(model)
        chain_dir = out / "_chain_source"
        f_of = chain_checkpoint(src, chain_dir, ordinary_token_ids(src), cfg.chain_mix, cfg.seed)
        model = chain_dir
    with deterministic(cfg.seed, cfg.threads):
        net, _, path = load_model(model, dtype="float32", with_mtp=True, progress=False)
        if out.resolve() == path.resolve():
            raise ValueError(f"out_dir {out} is the source checkpoint; choose another directory")
        gen = torch.Generator().manual_seed(cfg.seed)
        vocab = ordinary_token_ids(path)
        n = cfg.train_sequences + cfg.eval_sequences
        prompts = vocab[torch.randint(len(vocab), (n, cfg.prompt_len), generator=gen)]
        seqs = greedy_continuations(net, prompts, cfg.new_tokens)
        train, held_out = seqs[: cfg.train_sequences], seqs[cfg.train_sequences :]
        _log(f"generated {n} sequences of {seqs.shape[1]} tokens: {_since(start):.1f} s")
        hidden, held_hidden = main_hidden(net, train), main_hidden(net, held_out)
        kl_before = held_out_kl(net, held_hidden, held_out, cfg.prompt_len)
        sharpness = _sharpness(net, held_hidden[:, cfg.prompt_len - 1 : -1])
        before, positions = acceptance(net, held_out, cfg.prompt_len)
        _log(
            f"held-out before: acceptance {before:.4f} ({positions} positions), kl {kl_before:.4f}"
        )
        t0 = time.perf_counter()
        train_mtp(net, hidden, train, cfg, gen)
        train_s = _since(t0)
        kl_after = held_out_kl(net, held_hidden, held_out, cfg.prompt_len)
        after, _ = acceptance(net, held_out, cfg.prompt_len)
        _log(f"held-out after: acceptance {after:.4f}, kl {kl_after:.4f}")
        write_checkpoint(path, out, net)
        if chain_dir is not None:
            shutil.rmtree(chain_dir)
        reloaded, _, _ = load_model(out, dtype="float32", with_mtp=True, progress=False)
        after_saved, _ = acceptance(reloaded, held_out, cfg.prompt_len)
    report = {
        "source": str(source),
        **asdict(cfg),
        "seconds": round(_since(start), 1),
        "train_seconds": round(train_s, 1),
        "eval_positions": positions,
        "held_out_kl": {"before": round(kl_before, 4), "after_fp32": round(kl_after, 4)},
        "acceptance": {
            "before": round(before, 4),
            "after_fp32": round(after, 4),
            "after_saved": round(after_saved, 4),
        },
        # how often token t+2 equals token t+1 in the held-out continuations: what drafting
        # a copy of the last token would get
        "repeat_last_token": round(_repeat_rate(held_out, cfg.prompt_len), 4),
        # how peaked the main model's next-token distribution is where it chose greedy tokens
        "main_model": sharpness,
    }
    if f_of is not None:
        # how often the main model's greedy token is the chain's
        report["main_model"]["follows_chain"] = round(follows(held_out, cfg.prompt_len, f_of), 4)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def _sharpness(model, hidden: torch.Tensor) -> dict:
    logp = model.compute_logits(hidden).log_softmax(-1)
    top2 = logp.topk(2, dim=-1).values
    return {
        "mean_top1_prob": round(logp.max(-1).values.exp().mean().item(), 4),
        "median_top1_top2_logit_gap": round((top2[..., 0] - top2[..., 1]).median().item(), 4),
        "mean_entropy_nats": round(-(logp.exp() * logp).sum(-1).mean().item(), 3),
        "uniform_entropy_nats": round(math.log(logp.shape[-1]), 3),
    }


def _repeat_rate(seqs: torch.Tensor, prompt_len: int) -> float:
    return (seqs[:, prompt_len:] == seqs[:, prompt_len - 1 : -1]).float().mean().item()


def _since(t: float) -> float:
    return time.perf_counter() - t
