"""A main model whose greedy output is mostly predictable, for measuring MTP acceptance on CPU.

The random qwen35-tiny chooses its next token among a nearly uniform distribution, so no draft
head learns it (docs/mtp.md). `chain_checkpoint` writes a copy of a checkpoint whose main model
mostly follows a fixed random chain over the ordinary tokens, x -> f(x):

- lm_head row f(x) points along token x's embedding as the final norm scales it, so a residual
  stream that still carries the current token's embedding makes f(x) its argmax;
- every layer's output projection (attention o_proj, GDN out_proj, the MLP's and experts'
  down_proj) is scaled by `mix`, so the layers still run and still push the residual stream
  away from the embedding, by an amount `mix` sets: 0 follows the chain always, 1 keeps the
  random layers at full weight (which never follow it). Measured on qwen35-tiny over greedy
  continuations: 0.10 follows it at 0.94 of positions, 0.15 at 0.55, 0.20 at 0.25.

The compute per step is the checkpoint's own (same shapes, same layers); only where the
tokens go changes. A synthetic model, made to give the draft head something to learn.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35_ray.model.weights import checkpoint_files

# tensors whose output is added to the residual stream, by name ending
OUTPUT_PROJECTIONS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")
# the norm of each lm_head row: logits of ~4 x sqrt(hidden) for the chain's token
ROW_NORM = 4.0


def chain(vocab: torch.Tensor, seed: int) -> dict[int, int]:
    """The chain x -> f(x): a seeded random permutation of the ordinary token ids."""
    g = torch.Generator().manual_seed(seed)
    return dict(zip(vocab.tolist(), vocab[torch.randperm(len(vocab), generator=g)].tolist()))


def chain_checkpoint(
    src: Path, out: Path, vocab: torch.Tensor, mix: float, seed: int
) -> dict[int, int]:
    """Write src's checkpoint to out with its main model following chain(vocab, seed) (module
    docstring); the vision tower and the `mtp.*` head are copied unchanged. Returns the
    chain."""
    if not 0 <= mix <= 1:
        raise ValueError(f"chain mix must be within 0..1, got {mix}")
    files = checkpoint_files(src)
    if len(files) != 1:
        raise ValueError(f"{src} has {len(files)} safetensors files; one is supported")
    text = json.loads((src / "config.json").read_text())
    text = text.get("text_config", text)
    if text.get("tie_word_embeddings"):
        raise ValueError(f"{src} ties lm_head to the embeddings; the chain needs its own rows")
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    f_of = chain(vocab, seed)
    with safe_open(str(files[0]), "pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    text_names = [n for n in tensors if not n.startswith(("mtp.", "model.visual."))]
    embed = _one(text_names, "embed_tokens.weight")
    norm = _one([n for n in text_names if "layers." not in n], "norm.weight")
    for name in text_names:
        if "layers." in name and name.endswith(OUTPUT_PROJECTIONS):
            tensors[name] = (tensors[name].float() * mix).to(tensors[name].dtype)
    head = tensors["lm_head.weight"].float()
    rows = tensors[embed].float()[vocab] * (1 + tensors[norm].float())  # zero-centred norm
    head[torch.tensor([f_of[x] for x in vocab.tolist()])] = (
        ROW_NORM * rows / rows.norm(dim=-1, keepdim=True)
    )
    tensors["lm_head.weight"] = head.to(tensors["lm_head.weight"].dtype)
    save_file(tensors, str(out / files[0].name), metadata=metadata)
    return f_of


def follows(seqs: torch.Tensor, start: int, f_of: dict[int, int]) -> float:
    """The share of tokens from `start` on that are f of the token before them."""
    prev, nxt = seqs[:, start - 1 : -1].flatten().tolist(), seqs[:, start:].flatten().tolist()
    return sum(f_of.get(a) == b for a, b in zip(prev, nxt)) / max(1, len(nxt))


def _one(names: list[str], suffix: str) -> str:
    found = [n for n in names if n.endswith(suffix)]
    if len(found) != 1:
        raise ValueError(f"expected one tensor ending in {suffix!r}, found {found}")
    return found[0]
