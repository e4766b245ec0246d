"""BERT: masked LM, sequence and token classification (``BertFor{MaskedLM,
SequenceClassification,TokenClassification}``).

BERT is a post-norm encoder: word + token-type + learned absolute position embeddings, then a
LayerNorm (tx ``embed_norm``); every sub-layer is ``LayerNorm(x + f(x))``; no final norm. The MLM
head is ``LayerNorm(act(dense(h)))`` through the tied word embeddings plus a vocabulary bias;
the classifier reads ``tanh(dense(h[CLS]))`` (tx ``pooler='cls'``). ``hidden_act='gelu'`` is the
exact erf GELU (tx ``gelu_exact``), not GPT-2's tanh approximation.
"""

from __future__ import annotations

import jax

from tx.kernels import masks
from tx.config import AttentionConfig, EmbedConfig, ModelConfig
from tx.interop.hf.common import (Entry, attention, bert_mlm_head, bert_mlp,
                                  check_architecture, dense, hf_activation, linear,
                                  no_gemma_options, norm, one, register_family, uniform_mask,
                                  unsupported)
from tx.layers import LayerNorm, Learned, MLPConfig
from tx.layers.mlp import gelu_exact
from tx.models import heads

ARCHITECTURES = {"bert": {"BertForMaskedLM": heads.MLMHead,
                          "BertForSequenceClassification": heads.Classifier,
                          "BertForTokenClassification": heads.TokenClassifier}}
# HF hidden_act -> (function, gated); a config saves as the first name of its activation.
_ACTIVATIONS = {"gelu": (gelu_exact, False), "gelu_new": (jax.nn.gelu, False),
                "gelu_pytorch_tanh": (jax.nn.gelu, False), "relu": (jax.nn.relu, False)}
# Tied copies (the decoder bias is cls.predictions.bias) and buffers of older checkpoints.
_IGNORED = ("cls.predictions.decoder.bias", "embeddings.position_ids")


def _head(head_cls: type, hf: dict):
    if head_cls is heads.MLMHead:
        return heads.MLMHead(tie=bool(hf.get("tie_word_embeddings", True)), bias=True,
                             transform=True)
    num_classes = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    if head_cls is heads.Classifier:
        return heads.Classifier(num_classes, heads.ClsPool(), bias=True)
    return heads.TokenClassifier(num_classes, bias=True)


def config(hf: dict, model_type: str) -> ModelConfig:
    head_cls = check_architecture(hf, model_type, ARCHITECTURES[model_type])
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        unsupported("position_embedding_type", kind, "tx maps BERT's learned absolute "
                    "positions only ('absolute').")
    for option in ("is_decoder", "add_cross_attention"):
        if hf.get(option):
            unsupported(option, hf[option], "tx maps the bidirectional BERT encoder only; set "
                        f"{option}=False.")
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        unsupported("hidden_act", act, f"tx maps {tuple(_ACTIVATIONS)}.")
    n = hf["num_attention_heads"]
    if hf["hidden_size"] % n:
        unsupported("num_attention_heads", n, "must divide hidden_size.")
    fn, gated = _ACTIVATIONS[act]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(num_heads=n, num_kv_heads=n, masks=(masks.Full(),),
                                  bias=True),
        positions=Learned(hf.get("max_position_embeddings", 512)),
        mlp=MLPConfig(hf["intermediate_size"], fn, gated=gated, bias=True),
        norm=LayerNorm(float(hf.get("layer_norm_eps", 1e-12)), pre=False),
        head=_head(head_cls, hf),
        embed=EmbedConfig(type_vocab_size=int(hf.get("type_vocab_size", 2)), norm=True))


def model_type(cfg: ModelConfig) -> str | None:
    """``bert`` when ``cfg`` is a BERT encoder with BERT's heads, else None."""
    a, head = cfg.attention, cfg.head
    body = (not cfg.norm.pre and isinstance(cfg.norm, LayerNorm) and
            isinstance(cfg.positions, Learned) and cfg.embed.norm and
            cfg.embed.type_vocab_size >= 1 and a.bias and cfg.mlp.bias and
            getattr(head, "bias", False) and hf_activation(_ACTIVATIONS, cfg.mlp) is not None and
            a.kv_heads == a.num_heads and cfg.head_dim * a.num_heads == cfg.d_model and
            uniform_mask(cfg) == masks.Full() and a.scale is None and
            getattr(head, "scale", 1.0) == 1.0 and no_gemma_options(cfg))
    known = {heads.MLMHead: lambda: head.transform,
             heads.Classifier: lambda: isinstance(head.pooler, heads.ClsPool),
             heads.TokenClassifier: lambda: True}
    return "bert" if body and known.get(type(head), lambda: False)() else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               intermediate_size=cfg.mlp.d_ff, hidden_act=hf_activation(_ACTIVATIONS, cfg.mlp),
               max_position_embeddings=cfg.positions.max_len,
               type_vocab_size=cfg.embed.type_vocab_size, layer_norm_eps=cfg.norm.eps,
               tie_word_embeddings=getattr(cfg.head, "tie", True), hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    if not isinstance(cfg.head, heads.MLMHead):
        labels = [f"LABEL_{i}" for i in range(cfg.head.num_classes)]
        out.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in
                                                                enumerate(labels)})
    return out


def _encoder_entries(encoder, cfg: ModelConfig) -> list[Entry]:
    tower, n, h = encoder.tower, cfg.num_heads, cfg.head_dim
    p = "bert.embeddings."
    out = [one(p + "word_embeddings.weight", tower.embed.table_vd),
           one(p + "position_embeddings.weight", tower.positions.table),
           one(p + "token_type_embeddings.weight", tower.token_types.table_vd),
           *norm(p + "LayerNorm", tower.embed_norm)]
    for i, block in enumerate(tower.blocks):
        p = f"bert.encoder.layer.{i}."
        out += attention(p + "attention.", block.self_attn, ("self.query", "self.key",
                                                             "self.value", "output.dense"),
                         n, n, h, bias=True)
        out += [*norm(p + "attention.output.LayerNorm", block.norms[0]),
                *bert_mlp(p, block)]
    return out


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    out = _encoder_entries(model.encoder, cfg)
    head = model.head
    if isinstance(cfg.head, heads.MLMHead):
        # Untied, the decoder keeps its own bias and cls.predictions.bias goes unused.
        out += bert_mlm_head(head, "cls.predictions.bias" if cfg.head.tie else
                             "cls.predictions.decoder.bias")
        if not cfg.head.tie:
            out.append(linear("cls.predictions.decoder.weight", head.proj.kernel))
        return out
    if isinstance(cfg.head, heads.Classifier):
        out += dense("bert.pooler.dense", model.pooler.dense)
    return out + dense("classifier", head.proj)


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    tied = ("cls.predictions.decoder.weight",) if getattr(cfg.head, "tie", True) else \
        ("cls.predictions.bias",)
    return _IGNORED + tied


def prepare(tensors: dict, model_type: str) -> dict:
    """Accepts bare ``BertModel`` names (no ``bert.`` prefix)."""
    if "embeddings.word_embeddings.weight" in tensors:
        return {k if k.startswith(("cls.", "classifier.")) else f"bert.{k}": v
                for k, v in tensors.items()}
    return tensors


register_family(__name__)
