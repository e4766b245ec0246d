"""Building blocks: embeddings, positions, norms, MLPs."""
from tx.layers.embed import Embed
from tx.layers.mlp import ACTIVATIONS, MLP
from tx.layers.norms import NORMS, make_norm
from tx.layers.positions import (ALiBi, LearnedPositions, RoPE, SinusoidalPositions,
                                 T5RelativeBias, alibi_slopes, sinusoidal, t5_bucket)
from tx.layers.rope_scaling import RopeScaling

__all__ = ['ACTIVATIONS', 'ALiBi', 'Embed', 'LearnedPositions', 'MLP', 'NORMS', 'RoPE',
           'RopeScaling', 'SinusoidalPositions', 'T5RelativeBias', 'alibi_slopes', 'make_norm',
           'sinusoidal', 't5_bucket']
