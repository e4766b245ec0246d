"""Funnel Transformer: masked LM (``FunnelForMaskedLM``, whose ``funnel`` is a ``FunnelModel``).

A tx ``MLMHead`` whose ``body`` is ``tx.models.funnel.Funnel``: word embeddings and a
LayerNorm (no positions, no token-type embeddings: token types enter the attention), post-norm
blocks of Funnel's relative attention (``tx.attention.funnel``), the upsampling decoder, and a
tied vocabulary projection with a bias. ``attention_type`` ``relative_shift`` and
``factorized`` compute the same scores, so both map (the parity tests check both).

Refused by name: ``block_repeats`` other than 1 (Hugging Face's first-block output then falls
inside the first block), ``truncate_seq=False`` with ``separate_cls`` (a pooling that does not
halve the length), hidden activations other than the GELUs and ReLU.
"""

from __future__ import annotations

import jax

from tx.config import AttentionConfig, EmbedConfig, ModelConfig
from tx.interop.hf.common import (Entry, check_architecture, dense, heads_in, heads_out,
                                  hf_activation, linear, norm, one, register_family, unsupported)
from tx.layers import LayerNorm, MLPConfig
from tx.layers.mlp import gelu_exact
from tx.layers.positions import NoPositions
from tx.models import heads
from tx.models.funnel import Funnel

ARCHITECTURES = {"funnel": {"FunnelForMaskedLM": heads.MLMHead}}
_ACTIVATIONS = {"gelu_new": (jax.nn.gelu, False), "gelu": (gelu_exact, False),
                "gelu_pytorch_tanh": (jax.nn.gelu, False), "relu": (jax.nn.relu, False)}


def _options(hf: dict) -> Funnel:
    sizes = tuple(int(b) for b in hf.get("block_sizes", (4, 4, 4)))
    repeats = hf.get("block_repeats") or [1] * len(sizes)
    if any(int(r) != 1 for r in repeats):
        unsupported("block_repeats", repeats, "tx maps Funnel blocks of distinct layers "
                    "(every repeat 1); list the layers in block_sizes instead.")
    if hf.get("separate_cls", True) and not hf.get("truncate_seq", True):
        unsupported("truncate_seq", False, "with separate_cls, a pooling that keeps the last "
                    "row does not halve the length; tx maps truncate_seq=True.")
    if hf.get("attention_type", "relative_shift") not in ("relative_shift", "factorized"):
        unsupported("attention_type", hf.get("attention_type"), "use relative_shift or "
                    "factorized (the same scores).")
    pooling = hf.get("pooling_type", "mean")
    if pooling not in ("mean", "max"):
        unsupported("pooling_type", pooling, "tx maps mean and max.")
    return Funnel(sizes, int(hf.get("num_decoder_layers", 2)), pooling,
                  bool(hf.get("separate_cls", True)), bool(hf.get("pool_q_only", True)))


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    act = hf.get("hidden_act", "gelu_new")
    if act not in _ACTIVATIONS:
        unsupported("hidden_act", act, f"tx maps {tuple(_ACTIVATIONS)}.")
    body = _options(hf)
    fn, gated = _ACTIVATIONS[act]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_layers=sum(body.blocks),
        attention=AttentionConfig(num_heads=hf["n_head"], num_kv_heads=hf["n_head"],
                                  head_dim=hf["d_head"], bias=True),
        positions=NoPositions(),
        mlp=MLPConfig(hf["d_inner"], fn, gated=gated, bias=True),
        norm=LayerNorm(float(hf.get("layer_norm_eps", 1e-9)), pre=False),
        head=heads.MLMHead(tie=bool(hf.get("tie_word_embeddings", True)), bias=True,
                           body=body),
        embed=EmbedConfig(norm=True))


def model_type(cfg: ModelConfig) -> str | None:
    """``funnel`` when ``cfg`` is an MLM head on a Funnel body that HF can hold."""
    head = cfg.head
    ok = (type(head) is heads.MLMHead and type(head.body) is Funnel and head.bias and
          not head.transform and head.scale == 1.0 and head.softcap is None and
          cfg.attention.bias and cfg.attention.scale is None and cfg.mlp.bias and
          isinstance(cfg.norm, LayerNorm) and cfg.embed.norm and
          hf_activation(_ACTIVATIONS, cfg.mlp) is not None)
    return "funnel" if ok else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    body = cfg.head.body
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_head=cfg.num_heads,
                d_head=cfg.head_dim, d_inner=cfg.mlp.d_ff, block_sizes=list(body.blocks),
                block_repeats=[1] * len(body.blocks), num_decoder_layers=body.decoder_layers,
                hidden_act=hf_activation(_ACTIVATIONS, cfg.mlp), layer_norm_eps=cfg.norm.eps,
                pooling_type=body.pooling, attention_type="relative_shift",
                separate_cls=body.separate_cls, truncate_seq=True,
                pool_q_only=body.pool_q_only, tie_word_embeddings=cfg.head.tie,
                hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _layer(p: str, layer, n: int, h: int) -> list[Entry]:
    a, p_attn = layer.self_attn, p + "attention."
    return [heads_in(p_attn + "q_head.weight", a.q_dnh, n, h),
            heads_in(p_attn + "k_head.weight", a.k_dkh, n, h),
            heads_in(p_attn + "k_head.bias", a.k_bias_kh, n, h),
            heads_in(p_attn + "v_head.weight", a.v_dkh, n, h),
            heads_in(p_attn + "v_head.bias", a.v_bias_kh, n, h),
            heads_out(p_attn + "post_proj.weight", a.o_nhd, n, h),
            one(p_attn + "post_proj.bias", a.o_bias_d),
            # Funnel stores these per head as tx does: [N, H], [D, N, H], [2, N, H].
            one(p_attn + "r_w_bias", a.content_bias_nh),
            one(p_attn + "r_r_bias", a.position_bias_nh),
            one(p_attn + "r_kernel", a.position_dnh),
            one(p_attn + "r_s_bias", a.segment_bias_nh),
            one(p_attn + "seg_embed", a.segment_snh),
            *norm(p_attn + "layer_norm", layer.norms[0]),
            *dense(p + "ffn.linear_1", layer.mlp.wi_gate),
            *dense(p + "ffn.linear_2", layer.mlp.wo),
            *norm(p + "ffn.layer_norm", layer.norms[1])]


def entries(model, model_type: str) -> list[Entry]:
    cfg, enc = model.config, model.encoder
    n, h = cfg.num_heads, cfg.head_dim
    out = [one("funnel.embeddings.word_embeddings.weight", enc.embed.table_vd),
           *norm("funnel.embeddings.layer_norm", enc.embed_norm)]
    for i, block in enumerate(enc.blocks):
        for j, layer in enumerate(block):
            out += _layer(f"funnel.encoder.blocks.{i}.{j}.", layer, n, h)
    for k, layer in enumerate(enc.decoder):
        out += _layer(f"funnel.decoder.layers.{k}.", layer, n, h)
    out.append(one("lm_head.bias", model.head.bias_v))
    if not cfg.head.tie:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    return out


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return ("lm_head.weight",) if cfg.head.tie else ()


def prepare(tensors: dict, model_type: str) -> dict:
    """Accepts bare ``FunnelModel`` names (no ``funnel.`` prefix)."""
    if "embeddings.word_embeddings.weight" in tensors:
        return {k if k.startswith("lm_head.") else f"funnel.{k}": v for k, v in tensors.items()}
    return tensors


register_family(__name__)
