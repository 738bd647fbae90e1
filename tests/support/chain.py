"""Checkpoints whose MTP head keeps drafts, for the speculative decoding tests: a chained main
model (model/mtp_chain.py) with a head distilled from it in a short run (about 6 s a model on
2 quiet cores; it keeps about a third of first drafts, tests/model/test_spec_decode_loop.py).
Made once per session by the `chain_checkpoint` fixture (tests/conftest.py)."""

from qwen35_ray.model.mtp_distill import DistillConfig, distill_mtp

SHORT_CHAIN = DistillConfig(
    steps=120, train_sequences=64, eval_sequences=8, prompt_len=12, new_tokens=40,
    batch_sequences=8, chain_mix=0.12,
)  # fmt: skip


class ChainCheckpoints:
    def __init__(self, tmp_path_factory):
        self._tmp, self._made = tmp_path_factory, {}

    def __call__(self, model: str = "qwen35-tiny"):
        """The distilled chain checkpoint of an embedded model ("qwen35-tiny": MoE,
        "qwen35-tiny-dense"), a directory."""
        if model not in self._made:
            out = self._tmp.mktemp(f"chain-{model}")
            distill_mtp(model, out, SHORT_CHAIN)
            self._made[model] = out
        return self._made[model]
