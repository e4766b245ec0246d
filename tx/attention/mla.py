"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv:2405.04434, and DeepSeek-V3).

K and V are compressed into one latent per token, ``c = norm(x W_a)[:r]`` of width
``kv_lora_rank`` (r), and expanded per head by ``k_b`` / ``v_b``; a decoupled RoPE key
``k_rope`` of width ``qk_rope_head_dim`` (dr) is shared by every head. Each head's query is
``[nope (dn) | rope (dr)]`` (optionally from a compressed ``q_lora_rank`` latent). Two forms
compute the same attention:

* expanded (training, prefill without a cache): per head ``k = [c k_b | k_rope]``,
  ``v = c v_b``, through the ``dense`` path (q/k head dim ``dn + dr``, v head dim ``dv``);
* absorbed (decoding from any cache): ``q' = [q_nope k_b^T | q_rope]`` of width ``r + dr``
  attends over keys ``[c | k_rope]`` stored ONCE per token (one kv head: MQA with a wide
  head) whose values are the first ``r`` columns of the keys (``value_dim=r``); the output
  ``[B, T, N, r]`` is expanded by ``v_b`` afterwards. The cache holds ``r + dr`` values per
  token for all heads together, instead of ``2 N H``.

``q_nope . (c k_b) == (q_nope k_b^T) . c``, so both forms use the logits scale
``(dn + dr) ** -0.5`` (``attention.scale`` overrides it: DeepSeek's YaRN mscale).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tx import parallel
from tx.attention import cache as cache_lib
from tx.attention import patterns, registry
from tx.attention.layer import _projection, rows_dot
from tx.attention.paged import PagedKVCache
from tx.kernels import masks as masks_lib
from tx.layers.positions import LayerRoPE, RoPE, Rotary
from tx.registry import Field, non_negative_int, positive_int


def _int(name: str, value, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"MLA.{name}={value!r} must be an integer >= {low}.")


@dataclasses.dataclass(frozen=True)
class MLA:
    """An MLA layer in the per-layer schedule (``attention.masks``): ``layer_pattern=mla,full``.

    ``num_heads`` is ``attention.num_heads``; ``num_kv_heads`` and ``head_dim`` do not apply.
    The layer is causal in a decoder and bidirectional in an encoder (the head decides)."""

    kv_lora_rank: int
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    q_lora_rank: int | None = None

    def __post_init__(self):
        _int("kv_lora_rank", self.kv_lora_rank, low=1)
        _int("qk_rope_head_dim", self.qk_rope_head_dim, low=2)
        _int("qk_nope_head_dim", self.qk_nope_head_dim, low=0)
        _int("v_head_dim", self.v_head_dim, low=1)
        if self.q_lora_rank is not None:
            _int("q_lora_rank", self.q_lora_rank, low=1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLA.qk_rope_head_dim (mla_rope_dim)={self.qk_rope_head_dim} is "
                             "odd: RoPE turns dimensions in pairs; use an even width, e.g. 64.")

    @property
    def mask(self) -> masks_lib.Mask:
        """What a decoding layer sees (for tools that draw the schedule)."""
        return masks_lib.Causal()

    @property
    def latent_width(self) -> int:
        """Values the decoding cache stores per token, for all heads: ``r + dr``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def check_config(self, cfg, layer: int = 0) -> None:
        """Refuses, by name, what this layer cannot be in ``cfg`` (``ModelConfig`` calls it,
        so a bad flag stops before anything is built or written)."""
        where = f"attention.masks[{layer}]={self!r}"
        if not isinstance(cfg.positions, (RoPE, LayerRoPE)):
            raise ValueError(f"{where} with positions={cfg.positions!r}: MLA rotates its "
                             "decoupled RoPE key and needs RoPE positions; set "
                             "positions='rope' (or a per-layer RoPE).")
        for name, rank in (("kv_lora_rank", self.kv_lora_rank),
                           ("q_lora_rank", self.q_lora_rank)):
            if rank is not None and rank > cfg.d_model:
                raise ValueError(f"{where}: {name}={rank} is larger than d_model="
                                 f"{cfg.d_model}; a low-rank compression is at most the model "
                                 f"width: lower {name} (mla_{name.split('_')[0]}_rank).")
        a = cfg.attention
        for name, on in (("attention.bias", a.bias), ("attention.qk_norm", a.qk_norm),
                         ("attention.sinks", a.sinks)):
            if on:
                raise ValueError(f"{where}: {name}=True is not part of an MLA layer (it would "
                                 f"be dropped); set {name}=False or use softmax layers.")
        layers = a.layer_masks(cfg.num_layers, self)
        if a.kv_heads != a.num_heads and all(isinstance(m, MLA) for m in layers):
            raise ValueError(f"{where}: attention.num_kv_heads={a.num_kv_heads} would be "
                             "dropped: every layer is MLA, whose cache is one latent for all "
                             "heads; leave num_kv_heads unset (set mla_kv_rank instead).")
        mod = a.score_mod
        if mod is not None and mod.learned(a.num_heads):
            raise ValueError(f"{where}: attention.score_mod={mod!r} has learned parameters, "
                             "which MLA layers do not own; use a fixed modifier or none.")

    def build_attention(self, cfg, *, layer: int, positions=None, rngs: nnx.Rngs):
        self.check_config(cfg, layer)
        if not isinstance(positions, Rotary):
            raise ValueError(f"attention.masks[{layer}]={self!r} with positions="
                             f"{cfg.positions!r}: MLA rotates its decoupled RoPE key and "
                             "needs RoPE positions; set positions='rope' (or 'layer_rope').")
        rotary = Rotary(self.qk_rope_head_dim, base=positions.base, scaling=positions.scaling)
        causal = bool(getattr(cfg.head, "causal", False))
        return MLAttention(self, cfg.d_model, cfg.attention.num_heads, rotary=rotary,
                           norm=cfg.norm, causal=causal,
                           implementation=cfg.attention.implementation,
                           scale=cfg.attention.scale, score_mod=cfg.attention.score_mod,
                           dtype=cfg.dtype, rngs=rngs)


class MLAttention(nnx.Module):
    """``[B, T, D] -> [B, T, D]`` multi-head latent self-attention (see the module doc)."""

    pageable = True

    def __init__(self, spec: MLA, d_model: int, num_heads: int, *, rotary: Rotary, norm,
                 causal: bool = True, implementation=(), scale: float | None = None,
                 score_mod=None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        registry.check(implementation)
        d, n = d_model, num_heads
        r, rq, dr = spec.kv_lora_rank, spec.q_lora_rank, spec.qk_rope_head_dim
        dn, dv = spec.qk_nope_head_dim, spec.v_head_dim
        qk = dn + dr
        heads = ("heads", "head_dim")
        if rq is None:  # absent parameters are None: no state entries
            self.q_dnh = _projection(rngs, (d, n, qk), ("embed", *heads), 0, (1, 2), param_dtype)
            self.q_a_dr = self.q_a_norm = self.q_b_rnh = None
        else:
            self.q_dnh = None
            self.q_a_dr = _projection(rngs, (d, rq), ("embed", None), 0, 1, param_dtype)
            self.q_a_norm = norm.build(rq, dtype=dtype, rngs=rngs)
            self.q_b_rnh = _projection(rngs, (rq, n, qk), (None, *heads), 0, (1, 2),
                                       param_dtype)
        self.kv_a_dr = _projection(rngs, (d, r + dr), ("embed", None), 0, 1, param_dtype)
        self.kv_a_norm = norm.build(r, dtype=dtype, rngs=rngs)
        self.k_b_rnh = _projection(rngs, (r, n, dn), (None, *heads), 0, (1, 2), param_dtype)
        self.v_b_rnh = _projection(rngs, (r, n, dv), (None, *heads), 0, (1, 2), param_dtype)
        self.o_nhd = _projection(rngs, (n, dv, d), (*heads, "embed"), (0, 1), 2, param_dtype)
        self.spec = spec
        self.rotary = rotary
        self.mask = masks_lib.Causal() if causal else masks_lib.Full()
        self.implementation = tuple(implementation)
        self.scale = qk ** -0.5 if scale is None else scale
        self.score_mod = score_mod
        self.dtype = dtype
        self.cache: nnx.Module | None = nnx.data(None)

    # -- decoding caches: one kv head of width r + dr, values its first r columns -------------
    def init_cache(self, batch: int, max_len: int, *, dtype=None, kv=None) -> None:
        """The contiguous (rolling for causal windows) latent cache; ``kv`` quantises it."""
        self.cache = nnx.data(cache_lib.make_cache(
            self.mask, batch, max_len, 1, self.spec.latent_width, dtype=dtype or self.dtype,
            kv=kv, value_dim=self.spec.kv_lora_rank))

    def paged_cache(self, block_tables, num_pages: int, page_size: int, *, fork_plan=None,
                    kv=None):
        """The paged latent cache (``tx.inference.generation.init_paged_cache`` calls it)."""
        return PagedKVCache(block_tables, num_pages, page_size, 1, self.spec.latent_width,
                            dtype=self.dtype, fork_plan=fork_plan, kv=kv,
                            value_dim=self.spec.kv_lora_rank)

    # -- the forward --------------------------------------------------------------------------
    def _queries(self, x):
        """``q [B, T, N, dn + dr]``, through the q latent when configured."""
        if self.q_dnh is not None:
            return rows_dot(x, self.q_dnh[...].astype(self.dtype), 1)
        cq = self.q_a_norm(rows_dot(x, self.q_a_dr[...].astype(self.dtype), 1))
        return rows_dot(cq.astype(self.dtype), self.q_b_rnh[...].astype(self.dtype), 1)

    def latent(self, x_btd, positions_bt):
        """``(q_nope [B,T,N,dn], q_rope [B,T,N,dr], c [B,T,r], k_rope [B,T,1,dr])`` with the
        rope parts rotated at ``positions_bt``."""
        r, dn = self.spec.kv_lora_rank, self.spec.qk_nope_head_dim
        q = self._queries(x_btd)
        kv = rows_dot(x_btd, self.kv_a_dr[...].astype(self.dtype), 1)        # [B, T, r + dr]
        c = self.kv_a_norm(kv[..., :r]).astype(self.dtype)
        q_rope, k_rope = self.rotary.rotate(q[..., dn:], kv[..., None, r:], positions_bt)
        q_nope = parallel.constrain(q[..., :dn], ("batch", None, "heads", None))
        return q_nope, q_rope, c, k_rope

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None, *,
                 context_bsd=None, segment_ids=None, kv_lengths=None) -> jax.Array:
        if context_bsd is not None:
            raise ValueError("context_bsd given to an MLA layer: MLA is self-attention; "
                             "cross-attention layers stay softmax attention.")
        b, t, _ = x_btd.shape
        x = x_btd.astype(self.dtype)
        if positions_bt is None:
            start = 0 if self.cache is None else self.cache.start()
            positions_bt = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        q_nope, q_rope, c, k_rope = self.latent(x, positions_bt)
        if self.cache is None:
            out = self._expanded(q_nope, q_rope, c, k_rope, segment_ids, kv_lengths)
        else:
            out = self._absorbed(q_nope, q_rope, c, k_rope, positions_bt, segment_ids,
                                 kv_lengths)
        out = rows_dot(out, self.o_nhd[...].astype(self.dtype), 2)
        return parallel.constrain(out, ("batch", None, "embed"))

    def _expanded(self, q_nope, q_rope, c, k_rope, segment_ids, kv_lengths):
        """Per-head K/V from the latent: one ``dense`` call with v's head dim ``dv``."""
        k_nope = rows_dot(c, self.k_b_rnh[...].astype(self.dtype), 1)         # [B, S, N, dn]
        v = rows_dot(c, self.v_b_rnh[...].astype(self.dtype), 1)              # [B, S, N, dv]
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3],
                                                               k_rope.shape[-1]))], axis=-1)
        # The no-cache protocol: the ``dense`` path, or the ring when a mesh splits the sequence.
        return cache_lib.NO_CACHE.attend(
            q, k, v, None, mask=self.mask, scale=self.scale, implementation=self.implementation,
            positions=_NO_POSITIONS, segment_ids=segment_ids, kv_lengths=kv_lengths,
            score_mod=self.score_mod)

    def absorbed_query(self, q_nope, q_rope):
        """``q' = [q_nope k_b^T | q_rope]`` ``[B, T, N, r + dr]``: the K up-projection folded
        into the query."""
        q_lat = jnp.einsum("btnh,rnh->btnr", q_nope, self.k_b_rnh[...].astype(self.dtype))
        return jnp.concatenate([q_lat, q_rope], axis=-1)

    def _absorbed(self, q_nope, q_rope, c, k_rope, positions_bt, segment_ids, kv_lengths):
        """Attention over the cached latent (one kv head), then the V up-projection."""
        q = self.absorbed_query(q_nope, q_rope)
        keys = jnp.concatenate([c[:, :, None, :], k_rope], axis=-1)          # [B, T, 1, r+dr]
        out = self.cache.attend(q, keys, None, positions_bt, mask=self.mask, scale=self.scale,
                                implementation=self.implementation, positions=_NO_POSITIONS,
                                segment_ids=segment_ids, kv_lengths=kv_lengths,
                                score_mod=self.score_mod)                     # [B, T, N, r]
        return jnp.einsum("btnr,rnh->btnh", out, self.v_b_rnh[...].astype(self.dtype))


class _NoBias:
    """The cache's position hook: the latent keys are rotated already, no logits bias."""

    def bias(self, q_pos, kv_pos):
        return None


_NO_POSITIONS = _NoBias()


# -- flag name: 'mla' in attention / layer_pattern ---------------------------------------------
# Flag defaults fit the small configs (d_model 64-128): DeepSeek-V3's own are 512 / 1536 / 64 /
# 128 / 128 (``tx.interop.hf.deepseek_v3`` reads them from a checkpoint).
FIELDS = (
    Field("mla_kv_rank", 64, "MLA: kv_lora_rank, the latent K/V width per token (<= d_model)",
          check=positive_int),
    Field("mla_q_rank", 0, "MLA: q_lora_rank, the query latent width (0: no q compression)",
          check=non_negative_int),
    Field("mla_rope_dim", 16, "MLA: qk_rope_head_dim, the shared RoPE key width (even)",
          check=positive_int),
    Field("mla_nope_dim", 32, "MLA: qk_nope_head_dim, each head's non-rotated q/k width",
          check=non_negative_int),
    Field("mla_v_dim", 32, "MLA: v_head_dim, each head's value width", check=positive_int),
)


def _mla(f, *, causal: bool) -> MLA:
    return MLA(f.mla_kv_rank, f.mla_rope_dim, f.mla_nope_dim, f.mla_v_dim,
               f.mla_q_rank or None)


def _mla_fields(v, causal: bool) -> dict | None:
    if type(v) is not MLA:
        return None
    return dict(mla_kv_rank=v.kv_lora_rank, mla_q_rank=v.q_lora_rank or 0,
                mla_rope_dim=v.qk_rope_head_dim, mla_nope_dim=v.qk_nope_head_dim,
                mla_v_dim=v.v_head_dim)


patterns.PATTERNS.register("mla", _mla, fields=FIELDS, prints=_mla_fields)
