"""The character-level GPT in PyTorch (same architecture and weights as ``model_flax``).

Attention is written out (no ``scaled_dot_product_attention``) so that Sophia-H's double backward
works on every backend and the arithmetic mirrors the Flax model line by line.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .common import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        mask = torch.tril(torch.ones(cfg.context, cfg.context, dtype=torch.bool))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, hd).transpose(1, 2) for z in (q, k, v))  # (b, h, t, hd)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact (erf) GELU, as in the Flax model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Pre-LN GPT: token + learned position embedding, ``n_layer`` blocks, final LayerNorm, head.

    ``forward(idx)`` maps int64 token ids (batch, time) to logits (batch, time, vocab).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.lnf = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:t]
        for block in self.blocks:
            x = block(x)
        x = self.lnf(x)
        return x @ self.wte.weight.T if self.head is None else self.head(x)

    @torch.no_grad()
    def load_canonical(self, params: dict[str, np.ndarray]) -> GPT:
        """Copies the weights of ``common.init_params`` (Linear weights there are (in, out))."""
        def put(tensor: torch.Tensor, value: np.ndarray, transpose: bool = False):
            value = torch.from_numpy(np.ascontiguousarray(value.T if transpose else value))
            if tensor.shape != value.shape:
                raise ValueError(f"shape mismatch: {tuple(tensor.shape)} vs {tuple(value.shape)}")
            tensor.copy_(value)

        put(self.wte.weight, params["wte"])
        put(self.wpe.weight, params["wpe"])
        for i, blk in enumerate(self.blocks):
            p = f"h{i}."
            put(blk.ln1.weight, params[p + "ln1.scale"])
            put(blk.ln1.bias, params[p + "ln1.bias"])
            put(blk.ln2.weight, params[p + "ln2.scale"])
            put(blk.ln2.bias, params[p + "ln2.bias"])
            for lin, name in ((blk.attn.qkv, "attn.qkv"), (blk.attn.proj, "attn.proj"),
                              (blk.mlp.fc, "mlp.fc"), (blk.mlp.proj, "mlp.proj")):
                put(lin.weight, params[p + name + ".w"], transpose=True)
                put(lin.bias, params[p + name + ".b"])
        put(self.lnf.weight, params["lnf.scale"])
        put(self.lnf.bias, params["lnf.bias"])
        if self.head is not None:
            put(self.head.weight, params["head.w"], transpose=True)
        return self


def build_model(cfg: ModelConfig, params: dict[str, np.ndarray]) -> GPT:
    return GPT(cfg).load_canonical(params)
