"""FNet: masked LM (``FNetForMaskedLM``).

FNet is BERT with every attention sub-layer replaced by Fourier token mixing
(``tx.attention.fnet.FNet``: ``real(fft2(x))`` over sequence and hidden, no parameters, no
attention mask: padding is mixed in, as HF's ``FNetModel`` does). Post-norm blocks
``LayerNorm(x + f(x))``; word + token-type + learned absolute positions, a LayerNorm, then a
dense ``projection`` (the one piece BERT lacks: tx builds it through :class:`FNetMLMHead`,
which wraps the tower's embedding norm); BERT's MLM head (dense, activation, LayerNorm, tied
decoder plus a vocabulary bias). ``hidden_act='gelu_new'`` (FNet's default) is the tanh GELU.
``use_tpu_fourier_optimizations`` computes the same transform with DFT matrices, so either
value maps.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from tx.attention.fnet import FNet
from tx.config import AttentionConfig, EmbedConfig, ModelConfig
from tx.interop.hf.common import (Entry, bert_mlm_head, bert_mlp, check_architecture, dense,
                                  hf_activation, no_gemma_options, norm, one, register_family,
                                  unsupported)
from tx.layers import LayerNorm, Learned, MLPConfig
from tx.layers.mlp import gelu_exact
from tx.models import heads


class _NormProject(nnx.Module):
    """``projection(norm(x))``: FNet's embedding norm followed by its dense projection."""

    def __init__(self, norm_module: nnx.Module, d_model: int, *, rngs: nnx.Rngs):
        self.norm = norm_module
        self.projection = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.projection(self.norm(x_btd)).astype(x_btd.dtype)


@dataclasses.dataclass(frozen=True)
class FNetMLMHead(heads.MLMHead):
    """BERT's MLM head on a tower whose embedding norm is followed by FNet's dense
    ``projection`` (``model.encoder.tower.embed_norm.projection``)."""

    def build(self, cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        if not cfg.embed.norm:
            raise ValueError("FNetMLMHead: embed.norm=False; FNet's projection follows the "
                             "embedding norm, so set embed.norm=True.")
        model = super().build(cfg, rngs=rngs)
        tower = model.encoder.tower
        tower.embed_norm = _NormProject(tower.embed_norm, cfg.d_model, rngs=rngs)
        return model


ARCHITECTURES = {"fnet": {"FNetForMaskedLM": FNetMLMHead}}
_ACTIVATIONS = {"gelu_new": (jax.nn.gelu, False), "gelu": (gelu_exact, False),
                "gelu_pytorch_tanh": (jax.nn.gelu, False), "relu": (jax.nn.relu, False)}
# Tied copies of the MLM decoder, the pooler FNetForMaskedLM carries but never uses for its
# logits, and buffers of older checkpoints.
_IGNORED = ("cls.predictions.decoder.bias", "cls.predictions.decoder.weight",
            "fnet.pooler.dense.weight", "fnet.pooler.dense.bias", "embeddings.position_ids",
            "embeddings.token_type_ids")


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    act = hf.get("hidden_act", "gelu_new")
    if act not in _ACTIVATIONS:
        unsupported("hidden_act", act, f"tx maps {tuple(_ACTIVATIONS)}.")
    if not hf.get("tie_word_embeddings", True):
        unsupported("tie_word_embeddings", False, "FNetForMaskedLM ties its decoder to the "
                    "word embeddings; tx maps the tied head only.")
    fn, gated = _ACTIVATIONS[act]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        # The heads are unused: every layer is Fourier mixing.
        attention=AttentionConfig(num_heads=1, num_kv_heads=1, masks=(FNet(),)),
        positions=Learned(hf.get("max_position_embeddings", 512)),
        mlp=MLPConfig(hf["intermediate_size"], fn, gated=gated, bias=True),
        norm=LayerNorm(float(hf.get("layer_norm_eps", 1e-12)), pre=False),
        head=FNetMLMHead(tie=True, bias=True, transform=True),
        embed=EmbedConfig(type_vocab_size=int(hf.get("type_vocab_size", 4)), norm=True))


def model_type(cfg: ModelConfig) -> str | None:
    """``fnet`` when ``cfg`` is an FNet encoder (every layer ``FNet()``) with its MLM head."""
    head = cfg.head
    ok = (type(head) is FNetMLMHead and head.tie and head.bias and head.transform and
          getattr(head, "scale", 1.0) == 1.0 and not cfg.norm.pre and
          isinstance(cfg.norm, LayerNorm) and isinstance(cfg.positions, Learned) and
          cfg.embed.norm and cfg.embed.type_vocab_size >= 1 and cfg.mlp.bias and
          hf_activation(_ACTIVATIONS, cfg.mlp) is not None and
          set(cfg.attention.masks) == {FNet()} and no_gemma_options(cfg))
    return "fnet" if ok else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.num_layers, intermediate_size=cfg.mlp.d_ff,
                hidden_act=hf_activation(_ACTIVATIONS, cfg.mlp),
                max_position_embeddings=cfg.positions.max_len,
                type_vocab_size=cfg.embed.type_vocab_size, layer_norm_eps=cfg.norm.eps,
                tie_word_embeddings=True, hidden_dropout_prob=0.0,
                use_tpu_fourier_optimizations=False)


def entries(model, model_type: str) -> list[Entry]:
    tower = model.encoder.tower
    p = "fnet.embeddings."
    out = [one(p + "word_embeddings.weight", tower.embed.table_vd),
           one(p + "position_embeddings.weight", tower.positions.table),
           one(p + "token_type_embeddings.weight", tower.token_types.table_vd),
           *norm(p + "LayerNorm", tower.embed_norm.norm),
           *dense(p + "projection", tower.embed_norm.projection)]
    for i, block in enumerate(tower.blocks):
        p = f"fnet.encoder.layer.{i}."
        out += [*norm(p + "fourier.output.LayerNorm", block.norms[0]), *bert_mlp(p, block)]
    return out + bert_mlm_head(model.head)


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return _IGNORED


def prepare(tensors: dict, model_type: str) -> dict:
    """Accepts bare ``FNetModel`` names (no ``fnet.`` prefix)."""
    if "embeddings.word_embeddings.weight" in tensors:
        return {k if k.startswith("cls.") else f"fnet.{k}": v for k, v in tensors.items()}
    return tensors


register_family(__name__)
