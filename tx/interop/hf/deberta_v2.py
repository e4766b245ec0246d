"""DeBERTa-v2/v3: masked LM (``DebertaV2ForMaskedLM``) with disentangled attention.

The body is BERT's post-norm encoder without absolute positions (``position_biased_input``
off): word (+ token-type, when ``type_vocab_size > 0``) embeddings, a LayerNorm, then blocks of
``LayerNorm(x + f(x))``. Positions enter every self-attention layer as DeBERTa's c2p/p2c terms
(tx ``positions=deberta``, ``tx.attention.deberta``): the encoder's ``rel_embeddings`` and its
LayerNorm (``norm_rel_ebd='layer_norm'``) projected by each layer's own query/key weights
(``share_att_key``), log buckets of relative distance (``position_buckets``,
``max_relative_positions``), logits over ``sqrt(H * (1 + terms))``.

The MLM head is BERT's (dense, activation, LayerNorm, tied word embeddings, vocabulary bias),
named ``cls.predictions.*`` when ``legacy`` (the config default) and
``lm_predictions.lm_head.*`` otherwise; ``prepare`` reads both, ``save`` writes the legacy
names with ``legacy=True``.

Refused by name: ``relative_attention=False``, ``position_biased_input``, a ``pos_att_type``
other than c2p/p2c, ``norm_rel_ebd`` other than ``layer_norm``, ``share_att_key=False``,
``conv_kernel_size`` (v2-xlarge's convolution), ``embedding_size != hidden_size``, an
``attention_head_size`` other than ``hidden_size / heads``.
"""

from __future__ import annotations

import jax

from tx.kernels import masks
from tx.attention.deberta import Deberta
from tx.config import AttentionConfig, EmbedConfig, ModelConfig
from tx.interop.hf.common import (Entry, attention, bert_mlm_head, bert_mlp,
                                  check_architecture, hf_activation, no_gemma_options, norm,
                                  one, register_family, uniform_mask, unsupported)
from tx.layers import LayerNorm, MLPConfig
from tx.layers.mlp import gelu_exact
from tx.models import heads

ARCHITECTURES = {"deberta-v2": {"DebertaV2ForMaskedLM": heads.MLMHead}}
_ACTIVATIONS = {"gelu": (gelu_exact, False), "gelu_new": (jax.nn.gelu, False),
                "gelu_pytorch_tanh": (jax.nn.gelu, False), "relu": (jax.nn.relu, False)}
# Tied copies of the word embeddings and the vocabulary bias, and an old buffer.
_IGNORED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
            "embeddings.position_ids")
# Non-legacy head names -> the legacy ones ``entries`` uses.
_HEAD_NAMES = {"lm_predictions.lm_head.dense.": "cls.predictions.transform.dense.",
               "lm_predictions.lm_head.LayerNorm.": "cls.predictions.transform.LayerNorm.",
               "lm_predictions.lm_head.bias": "cls.predictions.bias"}


def _terms(hf: dict) -> tuple[str, ...]:
    kinds = hf.get("pos_att_type") or []
    if isinstance(kinds, str):  # older configs spell it "p2c|c2p"
        kinds = [k.strip() for k in kinds.lower().split("|")]
    if not kinds or not set(kinds) <= {"c2p", "p2c"}:
        unsupported("pos_att_type", hf.get("pos_att_type"), "tx maps c2p and p2c (one or "
                    "both); p2p and an empty list are not implemented.")
    return tuple(kinds)


def _check_options(hf: dict) -> None:
    if not hf.get("relative_attention", False):
        unsupported("relative_attention", hf.get("relative_attention", False),
                    "tx maps DeBERTa's disentangled attention; set relative_attention=True.")
    if hf.get("position_biased_input", True):
        unsupported("position_biased_input", hf.get("position_biased_input", True),
                    "absolute positions on top of the relative ones are not implemented (v3 "
                    "checkpoints set it False).")
    rel_norm = [x.strip() for x in str(hf.get("norm_rel_ebd", "none")).lower().split("|")]
    if rel_norm != ["layer_norm"]:
        unsupported("norm_rel_ebd", hf.get("norm_rel_ebd", "none"), "tx maps 'layer_norm' "
                    "(the relative embeddings' LayerNorm) only.")
    if not hf.get("share_att_key", False):
        unsupported("share_att_key", hf.get("share_att_key", False), "separate pos_key_proj "
                    "/ pos_query_proj are not implemented; tx projects the relative "
                    "embeddings with the layer's own query/key weights (share_att_key=True).")
    if hf.get("conv_kernel_size", 0):
        unsupported("conv_kernel_size", hf["conv_kernel_size"], "the convolution layer beside "
                    "the first block (DeBERTa-v2-xlarge) is not implemented.")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("embedding_size", d) != d:
        unsupported("embedding_size", hf["embedding_size"], f"must equal hidden_size={d} (no "
                    "embed_proj).")
    if d % n or hf.get("attention_head_size", d // n) != d // n:
        unsupported("attention_head_size", hf.get("attention_head_size"), f"must be "
                    f"hidden_size / num_attention_heads = {d} / {n}.")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        unsupported("hidden_act", act, f"tx maps {tuple(_ACTIVATIONS)}.")


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    _check_options(hf)
    n = hf["num_attention_heads"]
    max_relative = hf.get("max_relative_positions", -1)
    if max_relative < 1:  # HF: the absolute length then bounds the distances
        max_relative = hf.get("max_position_embeddings", 512)
    fn, gated = _ACTIVATIONS[hf.get("hidden_act", "gelu")]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(num_heads=n, num_kv_heads=n, masks=(masks.Full(),),
                                  bias=True),
        positions=Deberta(int(hf.get("position_buckets", -1)), int(max_relative), _terms(hf)),
        mlp=MLPConfig(hf["intermediate_size"], fn, gated=gated, bias=True),
        norm=LayerNorm(float(hf.get("layer_norm_eps", 1e-7)), pre=False),
        head=heads.MLMHead(tie=True, bias=True, transform=True),
        embed=EmbedConfig(type_vocab_size=int(hf.get("type_vocab_size", 0)), norm=True))


def model_type(cfg: ModelConfig) -> str | None:
    """``deberta-v2`` when ``cfg`` is a post-norm encoder with DeBERTa positions and the tied
    MLM head, else None."""
    a, head = cfg.attention, cfg.head
    body = (not cfg.norm.pre and isinstance(cfg.norm, LayerNorm) and
            isinstance(cfg.positions, Deberta) and cfg.embed.norm and a.bias and
            cfg.mlp.bias and hf_activation(_ACTIVATIONS, cfg.mlp) is not None and
            a.kv_heads == a.num_heads and cfg.head_dim * a.num_heads == cfg.d_model and
            uniform_mask(cfg) == masks.Full() and a.scale is None and no_gemma_options(cfg))
    mlm = isinstance(head, heads.MLMHead) and head.transform and head.tie and head.bias and \
        getattr(head, "scale", 1.0) == 1.0
    return "deberta-v2" if body and mlm else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    p = cfg.positions
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.mlp.d_ff, hidden_act=hf_activation(_ACTIVATIONS, cfg.mlp),
                type_vocab_size=cfg.embed.type_vocab_size, layer_norm_eps=cfg.norm.eps,
                relative_attention=True, position_biased_input=False,
                pos_att_type=list(p.terms), norm_rel_ebd="layer_norm", share_att_key=True,
                position_buckets=p.position_buckets,
                max_relative_positions=p.max_relative_positions,
                max_position_embeddings=p.max_relative_positions, legacy=True,
                tie_word_embeddings=True, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    tower, n, h = model.encoder.tower, cfg.num_heads, cfg.head_dim
    p = "deberta.embeddings."
    out = [one(p + "word_embeddings.weight", tower.embed.table_vd),
           *norm(p + "LayerNorm", tower.embed_norm),
           one("deberta.encoder.rel_embeddings.weight", tower.positions.rel_rd),
           *norm("deberta.encoder.LayerNorm", tower.positions.norm)]
    if tower.token_types is not None:
        out.append(one(p + "token_type_embeddings.weight", tower.token_types.table_vd))
    for i, block in enumerate(tower.blocks):
        p = f"deberta.encoder.layer.{i}."
        out += attention(p + "attention.", block.self_attn,
                         ("self.query_proj", "self.key_proj", "self.value_proj",
                          "output.dense"), n, n, h, bias=True)
        out += [*norm(p + "attention.output.LayerNorm", block.norms[0]), *bert_mlp(p, block)]
    return out + bert_mlm_head(model.head)


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return _IGNORED


def prepare(tensors: dict, model_type: str) -> dict:
    """Non-legacy head names read as the legacy ones; bare ``DebertaV2Model`` names get
    their ``deberta.`` prefix."""
    out = {}
    for key, value in tensors.items():
        for old, new in _HEAD_NAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if key.startswith(("embeddings.", "encoder.")):
            key = "deberta." + key
        out[key] = value
    return out


register_family(__name__)
