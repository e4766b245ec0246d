"""Building blocks: embeddings, positions, norms, MLPs, and the config values that build them."""
from tx.layers.embed import Embed
from tx.layers.mlp import ACTIVATIONS, MLP, MLPConfig
from tx.layers.norms import NORMS, LayerNorm, RMSNorm, make_norm
from tx.layers.positions import (ALiBiBias, ALiBiSlopes, Learned, LearnedPositions, NoPositions,
                                 Positions, RoPE, Rotary, Sinusoidal, SinusoidalPositions,
                                 T5Buckets, T5RelativeBias, alibi_slopes, sinusoidal, t5_bucket)
from tx.layers.rope_scaling import RopeScaling

__all__ = ['ACTIVATIONS', 'ALiBiBias', 'ALiBiSlopes', 'Embed', 'LayerNorm', 'Learned',
           'LearnedPositions', 'MLP', 'MLPConfig', 'NORMS', 'NoPositions', 'Positions', 'RMSNorm',
           'RoPE', 'RopeScaling', 'Rotary', 'Sinusoidal', 'SinusoidalPositions', 'T5Buckets',
           'T5RelativeBias', 'alibi_slopes', 'make_norm', 'sinusoidal', 't5_bucket']
