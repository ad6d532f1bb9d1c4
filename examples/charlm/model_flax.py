"""The character-level GPT in Flax NNX (same architecture and weights as ``model_torch``).

Training uses the functional form: ``graphdef, state = nnx.split(model)`` once, then
``apply(params, idx) = nnx.merge(graphdef, params)(idx)`` inside ``jax.jit``, with ``params`` the
plain nested dict ``nnx.to_pure_dict(state)``: that dict is what optax, so_optax and Sophia's
``logits_fn`` / ``obj_fn`` see.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .common import ModelConfig


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.n_head = cfg.n_head
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, rngs=rngs)
        self.proj = nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = (z.reshape(b, t, self.n_head, hd).transpose(0, 2, 1, 3) for z in (q, k, v))
        att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))
        att = jax.nn.softmax(jnp.where(mask, att, -jnp.inf), axis=-1)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.proj(y)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.fc = nnx.Linear(cfg.d_model, 4 * cfg.d_model, rngs=rngs)
        self.proj = nnx.Linear(4 * cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(jax.nn.gelu(self.fc(x), approximate=False))  # exact GELU, as torch's default


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
    """Pre-LN GPT: token + learned position embedding, ``n_layer`` blocks, final LayerNorm, head.

    ``model(idx)`` maps int32 token ids (batch, time) to float32 logits (batch, time, vocab).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.wpe = nnx.Embed(cfg.context, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.lnf = nnx.LayerNorm(cfg.d_model, epsilon=cfg.ln_eps, rngs=rngs)
        self.head = (None if cfg.tie_embeddings
                     else nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs))

    def __call__(self, idx: jax.Array) -> jax.Array:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe.embedding[:t]
        for block in self.blocks:
            x = block(x)
        x = self.lnf(x)
        return self.wte.attend(x) if self.head is None else self.head(x)

    def load_canonical(self, params: dict[str, np.ndarray]) -> GPT:
        """Copies the weights of ``common.init_params`` (same (in, out) layout as nnx.Linear)."""
        def put(var: nnx.Variable, value: np.ndarray):
            if tuple(var.shape) != tuple(value.shape):
                raise ValueError(f"shape mismatch: {var.shape} vs {value.shape}")
            var[...] = jnp.asarray(value, dtype=jnp.float32)

        put(self.wte.embedding, params["wte"])
        put(self.wpe.embedding, params["wpe"])
        for i, blk in enumerate(self.blocks):
            p = f"h{i}."
            put(blk.ln1.scale, params[p + "ln1.scale"])
            put(blk.ln1.bias, params[p + "ln1.bias"])
            put(blk.ln2.scale, params[p + "ln2.scale"])
            put(blk.ln2.bias, params[p + "ln2.bias"])
            for lin, name in ((blk.attn.qkv, "attn.qkv"), (blk.attn.proj, "attn.proj"),
                              (blk.mlp.fc, "mlp.fc"), (blk.mlp.proj, "mlp.proj")):
                put(lin.kernel, params[p + name + ".w"])
                put(lin.bias, params[p + name + ".b"])
        put(self.lnf.scale, params["lnf.scale"])
        put(self.lnf.bias, params["lnf.bias"])
        if self.head is not None:
            put(self.head.kernel, params["head.w"])
        return self


def build_model(cfg: ModelConfig, params: dict[str, np.ndarray]):
    """Returns ``(apply, params)``: a pure ``apply(params, idx) -> logits`` and the weights, loaded
    from the canonical NumPy initialisation, as a plain nested dict of arrays (what optax sees)."""
    model = GPT(cfg, nnx.Rngs(0)).load_canonical(params)
    graphdef, state = nnx.split(model)

    def apply(p, idx):
        return nnx.merge(graphdef, p)(idx)

    return apply, nnx.to_pure_dict(state)
