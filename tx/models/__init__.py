"""tx models: encoder-only, decoder-only and encoder-decoder, built from a ModelConfig.

The config's head value chooses the model (``tx.models.heads``); ``build`` only seeds it.
"""

from flax import nnx

from tx.config import ModelConfig
from tx.models import heads
from tx.models.decoder import DecoderLM
from tx.models.encoder import Encoder, MaskedLM, SequenceClassifier, TokenClassifier
from tx.models.seq2seq import Seq2Seq
from tx.models.tower import Tower


def build(cfg: ModelConfig, *, seed: int = 0) -> nnx.Module:
    """The model ``cfg.head`` builds, initialised from ``seed``."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg={type(cfg).__name__}: give a tx.config.ModelConfig (from flags: "
                         "tx.flags.model_config(...)).")
    return cfg.head.build(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


__all__ = ["build", "heads", "DecoderLM", "Encoder", "MaskedLM", "SequenceClassifier",
           "TokenClassifier", "Seq2Seq", "Tower", "ModelConfig"]
