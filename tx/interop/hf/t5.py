"""T5 (``T5ForConditionalGeneration``): v1.0 (``relu``) and v1.1 (``gated-gelu``) feed-forwards.

T5 is a pre-norm encoder-decoder with RMSNorm without mean subtraction (tx ``rmsnorm``), no
biases, no absolute positions and unscaled attention logits (tx ``attention_scale=1.0``: the
``1/sqrt(H)`` is folded into the initialisation). Each stack's first layer owns a learned
relative position bias shared by all its layers (tx creates one ``T5RelativeBias`` per tower:
bidirectional buckets in the encoder, causal in the decoder); cross-attention has none. Source
and target share one embedding table. When the decoder output feeds the tied embeddings,
transformers multiplies it by ``d_model ** -0.5`` first (``scale_decoder_outputs``; tx
``head_scale``). transformers >= 5 always writes ``tie_word_embeddings=True`` for T5, so an
untied head shows only in the weights: a distinct ``lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import numpy as np

from tx.kernels import masks
from tx.config import AttentionConfig, ModelConfig
from tx.interop.hf.common import (Entry, attention, check_architecture, hf_activation, linear,
                                  one, plain_body, register_family, uniform_mask, unsupported)
from tx.layers import MLPConfig, RMSNorm, T5Buckets
from tx.layers.mlp import gelu_exact
from tx.models.heads import Seq2SeqLM

ARCHITECTURES = {"t5": {"T5ForConditionalGeneration": Seq2SeqLM}}
# HF feed_forward_proj -> (function, gated); a config saves as the first name of its activation.
_FEED_FORWARD = {"relu": (jax.nn.relu, False), "gated-gelu": (jax.nn.gelu, True),
                 "gated-gelu_new": (jax.nn.gelu, True), "gated-silu": (jax.nn.silu, True),
                 "gelu": (gelu_exact, False), "gelu_new": (jax.nn.gelu, False)}
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "EncDecAttention.relative_attention_bias.weight")


def _scaled(hf: dict) -> bool:
    """Whether the decoder output is scaled by ``d_model ** -0.5`` before the head."""
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FEED_FORWARD:
        unsupported("feed_forward_proj", ff, f"tx maps {tuple(_FEED_FORWARD)}.")
    if hf.get("is_decoder"):
        unsupported("is_decoder", True, "a T5ForConditionalGeneration config has "
                    "is_decoder=False; decoder-only T5 stacks are not mapped.")
    d, n = hf["d_model"], hf["num_heads"]
    layers = hf["num_layers"]
    decoder_layers = hf.get("num_decoder_layers") or layers
    fn, gated = _FEED_FORWARD[ff]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=layers,
        attention=AttentionConfig(num_heads=n, num_kv_heads=n, masks=(masks.Full(),),
                                  head_dim=None if hf["d_kv"] * n == d else hf["d_kv"],
                                  scale=1.0),
        positions=T5Buckets(int(hf.get("relative_attention_num_buckets", 32)),
                         int(hf.get("relative_attention_max_distance", 128))),
        mlp=MLPConfig(hf["d_ff"], fn, gated=gated),
        norm=RMSNorm(float(hf.get("layer_norm_epsilon", 1e-6))),
        head=Seq2SeqLM(tie=hf.get("tie_word_embeddings", True) is not False,
                       scale=d ** -0.5 if _scaled(hf) else 1.0, masks=(masks.Causal(),),
                       num_layers=None if decoder_layers == layers else decoder_layers))


def with_tensors(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """Untied exactly when the checkpoint carries its own, different ``lm_head.weight``."""
    head, shared = tensors.get("lm_head.weight"), tensors.get("shared.weight")
    untied = head is not None and (shared is None or not np.array_equal(head, shared))
    return replace(cfg, head=replace(cfg.head, tie=not untied))


def model_type(cfg: ModelConfig) -> str | None:
    """``t5`` when ``cfg`` is a T5-shaped encoder-decoder, else None."""
    a, head = cfg.attention, cfg.head
    ok = (isinstance(head, Seq2SeqLM) and plain_body(cfg) and cfg.norm.pre and
          isinstance(cfg.norm, RMSNorm) and isinstance(cfg.positions, T5Buckets) and
          hf_activation(_FEED_FORWARD, cfg.mlp) is not None and a.scale == 1.0 and
          not (a.bias or cfg.mlp.bias) and not head.bias and a.kv_heads == a.num_heads and
          uniform_mask(cfg) == masks.Full() and set(head.masks) <= {masks.Causal()})
    return "t5" if ok else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    head = cfg.head
    if head.scale not in (1.0, cfg.d_model ** -0.5):
        unsupported("head_scale", head.scale, "T5 scales the decoder output by "
                    "d_model ** -0.5 or not at all.")
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim,
                d_ff=cfg.mlp.d_ff, num_layers=cfg.num_layers,
                num_decoder_layers=head.num_layers or cfg.num_layers,
                num_heads=cfg.num_heads, feed_forward_proj=hf_activation(_FEED_FORWARD, cfg.mlp),
                relative_attention_num_buckets=cfg.positions.num_buckets,
                relative_attention_max_distance=cfg.positions.max_distance, n_positions=512,
                layer_norm_epsilon=cfg.norm.eps, dropout_rate=0.0,
                tie_word_embeddings=head.tie, scale_decoder_outputs=head.scale != 1.0,
                is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1)


def _mlp(prefix: str, mlp) -> list[Entry]:
    if mlp.wi_up is None:
        return [linear(prefix + "wi.weight", mlp.wi_gate.kernel),
                linear(prefix + "wo.weight", mlp.wo.kernel)]
    return [linear(prefix + "wi_0.weight", mlp.wi_gate.kernel),  # through the activation
            linear(prefix + "wi_1.weight", mlp.wi_up.kernel),
            linear(prefix + "wo.weight", mlp.wo.kernel)]


def _stack(name: str, tower, cfg: ModelConfig) -> list[Entry]:
    n, h = cfg.num_heads, cfg.head_dim
    qkvo = ("q", "k", "v", "o")
    out = [one(f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
               tower.positions.table),
           one(f"{name}.final_layer_norm.weight", tower.final_norm.scale)]
    for i, block in enumerate(tower.blocks):
        p = f"{name}.block.{i}.layer."
        out += attention(p + "0.SelfAttention.", block.self_attn, qkvo, n, n, h, bias=False)
        out.append(one(p + "0.layer_norm.weight", block.norms[0].scale))
        if block.cross_attn is not None:
            out += attention(p + "1.EncDecAttention.", block.cross_attn, qkvo, n, n, h,
                             bias=False)
            out.append(one(p + "1.layer_norm.weight", block.norms[1].scale))
        last = len(block.norms) - 1
        out += _mlp(f"{p}{last}.DenseReluDense.", block.mlp)
        out.append(one(f"{p}{last}.layer_norm.weight", block.norms[last].scale))
    return out


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    out = [one("shared.weight", model.encoder.embed.table_vd),
           *_stack("encoder", model.encoder.tower, cfg), *_stack("decoder", model.decoder, cfg)]
    if not cfg.head.tie:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    return out


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return _IGNORED + (("lm_head.weight",) if cfg.head.tie else ())


def prepare(tensors: dict, model_type: str) -> dict:
    """Checkpoints that name the shared table only through the encoder's copy."""
    if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
        tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    return tensors


register_family(__name__)
