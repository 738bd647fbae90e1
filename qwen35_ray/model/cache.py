"""HybridCache: the per-request memory of the hybrid model, as plain tensors.

GDN layers keep a fixed-size state per sequence in a slot: a conv state [C, W-1] (the last
inputs of the depthwise conv) and a recurrent state [HV, K, V] in fp32. Full-attention layers
keep K and V per token in a paged cache of blocks. Who owns which slot and block is decided
above the model (the engine); the model only reads and writes what a ForwardBatch names.
"""

from dataclasses import dataclass, field

import torch

from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.decode_kv import DecodeKV


@dataclass
class HybridCache:
    conv: torch.Tensor  # [n_gdn, S, C, W-1] model dtype
    recurrent: torch.Tensor  # [n_gdn, S, HV, K, V] fp32
    key: torch.Tensor  # [n_attn, N, P, Hkv, D]; the MTP layers' caches come last
    value: torch.Tensor  # [n_attn, N, P, Hkv, D]
    block_size: int
    # CPU with the torch kernels only: each attention layer's contiguous K/V copy for decode
    # (decode_kv.py)
    decode_kv: list[DecodeKV] = field(default_factory=list)

    def decode_kv_of(self, layer: int) -> DecodeKV | None:
        return self.decode_kv[layer] if self.decode_kv else None

    @property
    def num_slots(self) -> int:
        return self.conv.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.key.shape[1]

    @staticmethod
    def bytes_per_slot(config: ModelConfig, dtype: torch.dtype) -> int:
        n = len(config.gdn_layers)
        conv = config.conv_dim * (config.linear_conv_kernel_dim - 1) * dtype.itemsize
        rec = config.linear_num_value_heads * config.linear_key_head_dim
        rec *= config.linear_value_head_dim * 4
        return n * (conv + rec)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, mtp=False):
        layers = len(config.attention_layers) + (config.mtp_num_hidden_layers if mtp else 0)
        per_token = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
        return layers * block_size * per_token

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_slots: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device="cpu",
        with_mtp: bool = False,
        decode_kv: bool = True,
    ) -> "HybridCache":
        """decode_kv: keep DecodeKV copies (on CPU only), which the torch kernels' attention
        decodes from; the Triton kernels read the paged blocks."""
        n_gdn = len(config.gdn_layers)
        n_attn = len(config.attention_layers) + (config.mtp_num_hidden_layers if with_mtp else 0)
        W = config.linear_conv_kernel_dim
        Hkv, D = config.num_key_value_heads, config.head_dim
        kv_shape = (n_attn, num_blocks, block_size, Hkv, D)
        copies = decode_kv and torch.device(device).type == "cpu"
        return cls(
            conv=torch.zeros(n_gdn, num_slots, config.conv_dim, W - 1, dtype=dtype, device=device),
            recurrent=torch.zeros(
                n_gdn,
                num_slots,
                config.linear_num_value_heads,
                config.linear_key_head_dim,
                config.linear_value_head_dim,
                dtype=torch.float32,
                device=device,
            ),
            key=torch.zeros(kv_shape, dtype=dtype, device=device),
            value=torch.zeros(kv_shape, dtype=dtype, device=device),
            block_size=block_size,
            decode_kv=[DecodeKV(num_slots, Hkv, D, dtype) for _ in range(n_attn)] if copies else [],
        )

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy the GDN states (conv and recurrent, every layer) of slot src into slot dst."""
        self._stale(dst)
        self.conv[:, dst] = self.conv[:, src]
        self.recurrent[:, dst] = self.recurrent[:, src]

    def read(self, slot: int, block_table: list[int], num_tokens: int, attn_layers: int):
        """One sequence's cache, compact: GDN states of its slot and the K/V of its first
        num_tokens tokens in position order (no block padding)."""
        P = self.block_size
        blocks = torch.tensor(block_table[: -(-num_tokens // P)], device=self.key.device)
        kv = lambda c: c[:attn_layers, blocks].flatten(1, 2)[:, :num_tokens]
        return {
            "conv": self.conv[:, slot].clone(),  # [n_gdn, C, W-1]
            "recurrent": self.recurrent[:, slot].clone(),  # [n_gdn, HV, K, V]
            "key": kv(self.key).clone(),  # [n_attn, L, Hkv, D]
            "value": kv(self.value).clone(),
        }

    def write(self, slot: int, block_table: list[int], tensors: dict[str, torch.Tensor]):
        """The inverse of read(): place a sequence's states and K/V into slot and blocks."""
        P = self.block_size
        n_attn, L = tensors["key"].shape[:2]
        self._stale(slot)
        self.conv[:, slot] = tensors["conv"].to(self.conv)
        self.recurrent[:, slot] = tensors["recurrent"].to(self.recurrent)
        pos = torch.arange(L, device=self.key.device)
        table = torch.tensor(block_table, device=self.key.device)
        flat = table[pos // P] * P + pos % P
        for name, cache in (("key", self.key), ("value", self.value)):
            cache[:n_attn].flatten(1, 2)[:, flat] = tensors[name].to(cache)

    def _stale(self, slot: int) -> None:
        """The slot's contents change outside a decode step: its DecodeKV copies are stale."""
        for d in self.decode_kv:
            d.invalidate([slot])
