"""Funnel Transformer (Dai et al., 2020, arXiv:2006.03236) as the body of a masked-LM model.

The encoder is a sequence of blocks; before each block after the first the hidden state is
pooled to half its length (pairs of rows, mean or max; the [CLS] row kept apart with
``separate_cls``), and the first layer of that block attends from the pooled queries to the
unpooled keys (``pool_q_only``; else keys are pooled too). The decoder upsamples the last
block's output back to the input length (each pooled row repeated over the rows it covers),
adds the first block's output and runs ``decoder_layers`` full-length layers, so token-level
heads (the MLM head) see every position. Attention is Funnel's relative attention
(``tx.attention.funnel``); blocks are post-norm, ``LayerNorm(x + f(x))``.

In a config, ``Funnel(blocks=(2, 2), decoder_layers=2)`` is the ``body`` of an ``MLMHead``
(flags: ``task=mlm funnel_blocks=2,2``); ``num_layers`` is the encoder's, ``sum(blocks)``.
The shapes a row of ``T`` tokens takes through the blocks are :meth:`Funnel.attention_shapes`
(``--print_config`` and ``tx.attention.explain`` report them).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx.attention import funnel as fa
from tx.kernels import masks as masks_lib
from tx.layers import Embed
from tx.layers.positions import NoPositions
from tx.registry import Field

POOLINGS = ("mean", "max")


@dataclasses.dataclass(frozen=True)
class Funnel:
    """The Funnel body: encoder ``blocks`` (layers per block; a pooling between blocks),
    ``decoder_layers`` after the upsampling, ``pooling`` (``mean`` / ``max``),
    ``separate_cls`` (row 0 is never pooled; the last row is dropped at each pooling, as
    Funnel's ``truncate_seq``), ``pool_q_only`` (the pooling layer's keys stay unpooled)."""

    blocks: tuple = (2, 2)
    decoder_layers: int = 2
    pooling: str = "mean"
    separate_cls: bool = True
    pool_q_only: bool = True

    def __post_init__(self):
        blocks = tuple(self.blocks) if isinstance(self.blocks, (list, tuple)) else self.blocks
        object.__setattr__(self, "blocks", blocks)
        if not isinstance(blocks, tuple) or not blocks or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"funnel.blocks={self.blocks!r}: give the layers of each block as "
                             "positive integers, e.g. (2, 2) (a pooling between blocks).")
        if isinstance(self.decoder_layers, bool) or not isinstance(self.decoder_layers, int) \
                or self.decoder_layers < 0:
            raise ValueError(f"funnel.decoder_layers={self.decoder_layers!r}: an integer >= 0 "
                             "(0: the upsampled sum feeds the head directly).")
        if self.pooling not in POOLINGS:
            raise ValueError(f"funnel.pooling={self.pooling!r}: use one of {POOLINGS}.")
        for name in ("separate_cls", "pool_q_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"funnel.{name}={getattr(self, name)!r}: True or False.")

    def check(self, cfg) -> None:
        """Refuses, by name, the config options Funnel does not combine with."""
        a = cfg.attention
        where = f"head.body={self!r}"
        fixes = [
            (cfg.num_layers != sum(self.blocks), "num_layers", cfg.num_layers,
             (f"the encoder has sum(funnel_blocks)={sum(self.blocks)} layers; set num_layers="
              f"{sum(self.blocks)}")),
            (not isinstance(cfg.positions, NoPositions), "positions", cfg.positions,
             "Funnel's relative attention carries the positions; set positions=none"),
            (cfg.norm.pre or getattr(cfg.norm, "sandwich", False), "norm", cfg.norm,
             "Funnel's blocks are post-norm; set pre_norm=False"),
            (a.kv_heads != a.num_heads, "num_kv_heads", a.kv_heads,
             "Funnel attention is multi-head; set num_kv_heads=num_heads"),
            (any(m != masks_lib.Full() for m in a.layer_masks(cfg.num_layers,
                                                              masks_lib.Full())),
             "attention.masks", a.masks, "Funnel layers see every key; drop the pattern"),
            (a.score_mod is not None or a.sinks or a.qk_norm, "attention options",
             (a.score_mod, a.sinks, a.qk_norm), ("score modifiers, sinks and q/k norms are not "
                                                 "implemented for Funnel attention; turn them "
                                                 "off")),
            (cfg.embed.type_vocab_size != 0 or cfg.embed.scale != 1.0, "embed", cfg.embed,
             ("Funnel's token types enter its attention, not the embedding; set "
              "type_vocab_size=0 and embed_scale=1.0")),
            (cfg.d_model % 2 != 0, "d_model", cfg.d_model,
             "Funnel's sinusoids need an even d_model"),
        ]
        for bad, name, value, fix in fixes:
            if bad:
                raise ValueError(f"{name}={value!r}: {fix} ({where}).")

    # -- geometry -----------------------------------------------------------------------------
    def stages(self, t: int) -> list[dict]:
        """Per block: ``length`` (rows), ``positions`` and ``index`` (the rows of the previous
        stage each row stands for) as numpy arrays; a length that does not pool is refused."""
        fa.check_length(t, len(self.blocks), where="Funnel")
        out = [dict(length=t, positions=np.arange(t, dtype=np.float64), index=None)]
        for _ in self.blocks[1:]:
            prev = out[-1]
            index = fa.pool_index(prev["length"], self.separate_cls)
            out.append(dict(length=len(index), positions=prev["positions"][index], index=index))
        return out

    def attention_shapes(self, t: int) -> dict[str, int]:
        """``{"block 1: 8 queries x 16 keys": 1, ...}``: layer calls per shape for rows of
        ``t`` tokens (what ``explain`` and ``--print_config`` report)."""
        out: dict[str, int] = collections.Counter()
        stages = self.stages(t)
        for i, n in enumerate(self.blocks):
            q = stages[i]["length"]
            first_keys = stages[i - 1]["length"] if i and self.pool_q_only else q
            out[f"block {i}: {q} queries x {first_keys} keys"] += 1
            if n > 1:
                out[f"block {i}: {q} queries x {q} keys"] += n - 1
        if self.decoder_layers:
            out[f"decoder: {t} queries x {t} keys"] += self.decoder_layers
        return dict(out)

    def build_mlm(self, cfg, head, *, rngs: nnx.Rngs) -> nnx.Module:
        self.check(cfg)
        return FunnelMaskedLM(cfg, head, self, rngs=rngs)


# -- modules ------------------------------------------------------------------------------------
class FunnelLayer(nnx.Module):
    """``norm(q + attn(q, kv))``, then ``norm(h + mlp(h))`` (post-norm)."""

    def __init__(self, cfg, body: Funnel, *, rngs: nnx.Rngs):
        a = cfg.attention
        self.self_attn = fa.FunnelAttention(
            cfg.d_model, a.num_heads, cfg.head_dim, bias=a.bias, scale=a.scale,
            separate_cls=body.separate_cls, implementation=a.implementation, dtype=cfg.dtype,
            rngs=rngs)
        self.mlp = cfg.mlp.build(cfg.d_model, dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                                 rngs=rngs)
        self.norms = nnx.List([cfg.norm.build(cfg.d_model, dtype=cfg.dtype, rngs=rngs)
                               for _ in range(2)])
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, q_btd, kv_bsd, q_side, kv_side, kv_lengths):
        attn = self.self_attn(q_btd, kv_bsd, q_positions=q_side[0], kv_positions=kv_side[0],
                              q_types_bt=q_side[1], kv_types_bs=kv_side[1],
                              kv_lengths=kv_lengths)
        h = self.norms[0](q_btd + self.dropout(attn))
        return self.norms[1](h + self.dropout(self.mlp(h)))


class FunnelEncoder(nnx.Module):
    """``tokens [B, T] -> hidden [B, T, D]``: embedding, pooled blocks, upsampling decoder
    (Hugging Face's ``FunnelModel``)."""

    def __init__(self, cfg, body: Funnel, *, rngs: nnx.Rngs):
        self.body = body
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.embed_norm = cfg.norm.build(cfg.d_model, dtype=cfg.dtype, rngs=rngs) \
            if cfg.embed.norm else None
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)
        self.blocks = nnx.List([nnx.List([FunnelLayer(cfg, body, rngs=rngs) for _ in range(n)])
                                for n in body.blocks])
        self.decoder = nnx.List([FunnelLayer(cfg, body, rngs=rngs)
                                 for _ in range(body.decoder_layers)])
        self.dtype = cfg.dtype

    def __call__(self, tokens_bt, *, lengths_b=None, token_types_bt=None, segment_ids_bt=None,
                 positions_bt=None) -> jax.Array:
        """``lengths_b [B]``: valid tokens per right-padded row; ``token_types_bt``: 0 / 1
        (segments), 2 ([CLS]); default 0."""
        if segment_ids_bt is not None:
            raise ValueError("segment_ids_bt (packed rows) given to a Funnel model: its "
                             "pooling mixes neighbouring rows, so packed documents would "
                             "merge; turn packing off for funnel_blocks.")
        if positions_bt is not None:
            raise ValueError("positions_bt given to a Funnel model: its relative positions "
                             "are the row's own (0..T-1); leave positions_bt unset.")
        b, t = tokens_bt.shape
        stages = self.body.stages(t)  # refuses a length that does not pool, before tracing on
        types = jnp.zeros((b, t), jnp.int32) if token_types_bt is None else \
            token_types_bt.astype(jnp.int32)
        lengths = lengths_b
        x = self.embed(tokens_bt).astype(self.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.dropout(x)
        full = (stages[0]["positions"], types)
        side, first = full, None
        for i, block in enumerate(self.blocks):
            for j, layer in enumerate(block):
                if i and j == 0:  # this block's pooling, in its first layer
                    index = stages[i]["index"]
                    pooled = fa.pool_hidden(x, self.body.separate_cls, self.body.pooling)
                    pooled_side = (stages[i]["positions"], side[1][:, index])
                    pooled_lengths = None if lengths is None else \
                        fa.pool_lengths(lengths, self.body.separate_cls)
                    if self.body.pool_q_only:
                        x = layer(pooled, x, pooled_side, side, lengths)
                    else:
                        x = layer(pooled, pooled, pooled_side, pooled_side, pooled_lengths)
                    side, lengths = pooled_side, pooled_lengths
                else:
                    x = layer(x, x, side, side, lengths)
            if i == 0:
                first = x
        up = fa.upsample(x, t, 2 ** (len(self.blocks) - 1), self.body.separate_cls)
        x = up + first
        for layer in self.decoder:
            x = layer(x, x, full, full, lengths_b)
        return x


class FunnelMaskedLM(nnx.Module):
    """``tokens [B, T] -> logits [B, T, V]`` (Hugging Face's ``FunnelForMaskedLM``)."""

    def __init__(self, cfg, head, body: Funnel, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = FunnelEncoder(cfg, body, rngs=rngs)
        self.head = head.output(cfg, self.encoder.embed, rngs=rngs)

    def __call__(self, tokens_bt, **kwargs) -> jax.Array:
        return self.head(self.encoder(tokens_bt, **kwargs))

    def attention_shapes(self, t: int) -> dict[str, int]:
        return self.encoder.body.attention_shapes(t)


# -- flags: the fields the mlm task reads for its body (tx.models.heads) -------------------------
def _blocks_check(name, value):
    try:
        ok = all(int(v) >= 1 and str(int(v)) == str(v).strip() for v in value)
    except (TypeError, ValueError):
        ok = False
    return None if ok else "give the layers of each Funnel block as a comma list of " \
        "positive integers, e.g. 2,2 (empty: no Funnel)."


FIELDS = (
    Field("funnel_blocks", (), "task=mlm: a Funnel Transformer body with these layers per "
          "block (2,2: one pooling); empty: the BERT-style tower", type=tuple,
          check=_blocks_check),
    Field("funnel_decoder_layers", 2, "Funnel: full-length layers after the upsampling",
          check=lambda n, v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 0
          else "an integer >= 0."),
    Field("funnel_pooling", "mean", "Funnel: pooling of row pairs, mean or max",
          check=lambda n, v: None if v in POOLINGS else f"use one of {POOLINGS}."),
    Field("funnel_separate_cls", True, "Funnel: row 0 ([CLS]) is never pooled"),
    Field("funnel_pool_q_only", True, "Funnel: a pooling layer's keys stay unpooled"),
)


def check_flags(f) -> None:
    """The Funnel fields mean something only with ``task=mlm`` and ``funnel_blocks`` set; any
    other combination would drop them, so it is refused naming both parts."""
    if f.funnel_blocks and f.task != "mlm":
        raise ValueError(f"funnel_blocks={','.join(map(str, f.funnel_blocks))}: a Funnel body "
                         f"is implemented for task=mlm only, not task={f.task!r}; leave "
                         "funnel_blocks empty or use task=mlm.")
    if not f.funnel_blocks:
        for field in FIELDS[1:]:
            if getattr(f, field.name) != field.default:
                raise ValueError(f"{field.name}={getattr(f, field.name)!r} without "
                                 "funnel_blocks: it configures a Funnel body; set "
                                 "funnel_blocks (e.g. 2,2) or drop it.")


def from_flags(f) -> Funnel | None:
    if not f.funnel_blocks:
        return None
    return Funnel(tuple(int(b) for b in f.funnel_blocks), f.funnel_decoder_layers,
                  f.funnel_pooling, f.funnel_separate_cls, f.funnel_pool_q_only)


def to_fields(body) -> dict | None:
    """The flags of ``body`` (None: no Funnel); False for a body no flags spell."""
    if body is None:
        return {}
    if type(body) is not Funnel:
        return None
    return dict(funnel_blocks=body.blocks, funnel_decoder_layers=body.decoder_layers,
                funnel_pooling=body.pooling, funnel_separate_cls=body.separate_cls,
                funnel_pool_q_only=body.pool_q_only)

