"""BERT: masked LM, sequence and token classification (``BertFor{MaskedLM,
SequenceClassification,TokenClassification}``).

BERT is a post-norm encoder: word + token-type + learned absolute position embeddings, then a
LayerNorm (tx ``embed_norm``); every sub-layer is ``LayerNorm(x + f(x))``; no final norm. The MLM
head is ``LayerNorm(act(dense(h)))`` through the tied word embeddings plus a vocabulary bias;
the classifier reads ``tanh(dense(h[CLS]))`` (tx ``pooler='cls'``). ``hidden_act='gelu'`` is the
exact erf GELU (tx ``gelu_exact``), not GPT-2's tanh approximation.
"""

from __future__ import annotations

from kernels import masks
from tx.config import ModelConfig
from tx.interop.hf.common import (Entry, activation_of, attention, check_architecture, dense,
                                  linear, no_gemma_options, norm, one, uniform_mask,
                                  unsupported)
from tx.layers import LayerNorm, Learned
from tx.models import heads

ARCHITECTURES = {"bert": {"BertForMaskedLM": "mlm", "BertForSequenceClassification": "seq_cls",
                          "BertForTokenClassification": "token_cls"}}
_ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
# Tied copies (the decoder bias is cls.predictions.bias) and buffers of older checkpoints.
_IGNORED = ("cls.predictions.decoder.bias", "embeddings.position_ids")


def fields(hf: dict, model_type: str) -> dict:
    task = check_architecture(hf, model_type, ARCHITECTURES[model_type])
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
    if hf["hidden_size"] % hf["num_attention_heads"]:
        unsupported("num_attention_heads", hf["num_attention_heads"], "must divide hidden_size.")
    out = dict(task=task, vocab_size=hf["vocab_size"],
               d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
               num_heads=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
               activation=_ACTIVATIONS[act], norm="layernorm", pre_norm=False,
               positions="learned", max_len=hf.get("max_position_embeddings", 512),
               tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
               norm_eps=float(hf.get("layer_norm_eps", 1e-12)), attention_bias=True,
               mlp_bias=True, type_vocab_size=int(hf.get("type_vocab_size", 2)),
               embed_norm=True, head_bias=True, head_transform=task == "mlm")
    if task != "mlm":
        out["num_classes"] = int(hf.get("num_labels") or len(hf.get("id2label") or {}) or 2)
    if task == "seq_cls":
        out["pooler"] = "cls"
    return out


def model_type(cfg: ModelConfig) -> str | None:
    """``bert`` when ``cfg`` is a BERT encoder with BERT's heads, else None."""
    a, head = cfg.attention, cfg.head
    body = (not cfg.norm.pre and isinstance(cfg.norm, LayerNorm) and
            isinstance(cfg.positions, Learned) and cfg.embed.norm and
            cfg.embed.type_vocab_size >= 1 and a.bias and cfg.mlp.bias and
            getattr(head, "bias", False) and activation_of(cfg) in _TO_HF and
            a.kv_heads == a.num_heads and cfg.head_dim * a.num_heads == cfg.d_model and
            uniform_mask(cfg) == masks.Full() and a.scale is None and
            getattr(head, "scale", 1.0) == 1.0 and no_gemma_options(cfg))
    known = {heads.MLMHead: lambda: head.transform,
             heads.Classifier: lambda: isinstance(head.pooler, heads.ClsPool),
             heads.TokenClassifier: lambda: True}
    return "bert" if body and known.get(type(head), lambda: False)() else None


_TO_HF = {tx: hf for hf, tx in _ACTIVATIONS.items() if hf != "gelu_pytorch_tanh"}


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               intermediate_size=cfg.mlp.d_ff, hidden_act=_TO_HF[activation_of(cfg)],
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
                *dense(p + "intermediate.dense", block.mlp.wi_gate),
                *dense(p + "output.dense", block.mlp.wo),
                *norm(p + "output.LayerNorm", block.norms[1])]
    return out


def entries(model, model_type: str) -> list[Entry]:
    cfg = model.config
    out = _encoder_entries(model.encoder, cfg)
    head = model.head
    if isinstance(cfg.head, heads.MLMHead):
        out += [*dense("cls.predictions.transform.dense", head.transform.dense),
                *norm("cls.predictions.transform.LayerNorm", head.transform.norm),
                # Untied, the decoder keeps its own bias and cls.predictions.bias goes unused.
                one("cls.predictions.bias" if cfg.head.tie else
                    "cls.predictions.decoder.bias", head.bias_v)]
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
