"""fp32 reference of the routed expert MLP: every (token, choice) pair computed on its own."""

import torch
import torch.nn.functional as F


def naive_moe(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H] gate rows first
    w_down: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float, device=x.device)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            gate, up = (w_gate_up[e].float() @ x[t].float()).chunk(2)
            out[t] += topk_weights[t, j].float() * (w_down[e].float() @ (F.silu(gate) * up))
    return out


def naive_topk_softmax(
    router_logits: torch.Tensor,  # [T, E]
    top_k: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [T, k] fp32, expert ids [T, k]): the k most probable experts, in order."""
    weights, ids = [], []
    for row in router_logits.float():
        probs = row.exp() / row.exp().sum()
        order = sorted(range(len(probs)), key=lambda e: -float(probs[e]))[:top_k]
        w = probs[order]
        weights.append(w / w.sum() if renormalize else w)
        ids.append(torch.tensor(order))
    return torch.stack(weights), torch.stack(ids)
