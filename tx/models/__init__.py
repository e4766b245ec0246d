"""tx models: encoder-only, decoder-only and encoder-decoder, built from a ModelConfig."""

from flax import nnx

from tx.config import ModelConfig
from tx.models.decoder import DecoderLM
from tx.models.encoder import Encoder, MaskedLM, SequenceClassifier, TokenClassifier
from tx.models.seq2seq import Seq2Seq
from tx.models.tower import Tower

_BY_TASK = {"lm": DecoderLM, "mlm": MaskedLM, "seq_cls": SequenceClassifier,
            "token_cls": TokenClassifier, "seq2seq": Seq2Seq}


def build(cfg: ModelConfig, *, seed: int = 0) -> nnx.Module:
    """The model for ``cfg.family`` / ``cfg.task``, initialised from ``seed``."""
    return _BY_TASK[cfg.task](cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


__all__ = ["build", "DecoderLM", "Encoder", "MaskedLM", "SequenceClassifier",
           "TokenClassifier", "Seq2Seq", "Tower", "ModelConfig"]
