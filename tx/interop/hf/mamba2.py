"""Mamba-2: causal LM (``Mamba2ForCausalLM``).

Blocks ``x + mixer(RMSNorm(x))`` with the SSD mixer (``tx.attention.recurrent.Mamba2``, built
as ``tx.attention.recurrent_ssd.Mamba2Layer``) and no MLP (``NoMLP``), a final RMSNorm and
the LM head (tied or not). No position signal: the recurrence orders the tokens. Layouts:
``in_proj``/``out_proj`` are torch Linears ``[out, in]``; the depthwise ``conv1d.weight``
``[C, 1, W]`` is tx's ``[W, C]``; ``A_log``, ``D``, ``dt_bias`` and the gated norm's weight
map as they are. Options tx does not compute (a ``time_step_limit`` that clamps, biases on the
projections, no conv bias, another activation, attention layers in ``layer_types``) raise a
ValueError naming the option.
"""

from __future__ import annotations

import math

import numpy as np

from tx.attention.recurrent_ssd import Mamba2, Mamba2Layer, NoMLP
from tx.config import AttentionConfig, ModelConfig
from tx.interop.hf.common import (check_architecture, linear, one, plain_body, register_family,
                                  unsupported)
from tx.layers import RMSNorm
from tx.layers.positions import NoPositions
from tx.models.heads import LMHead

ARCHITECTURES = {"mamba2": {"Mamba2ForCausalLM": LMHead}}
_CHUNK = 64  # positions per chunk of the parallel form (the result does not depend on it)


def _number(x) -> float:
    """A float of config.json; ``transformers`` writes infinities as ``{"__float__":
    "Infinity"}``."""
    return float(x["__float__"]) if isinstance(x, dict) and "__float__" in x else float(x)


def _check_options(hf: dict) -> None:
    limit = hf.get("time_step_limit", (0.0, math.inf))
    if tuple(_number(x) for x in limit) != (0.0, math.inf):
        unsupported("time_step_limit", limit, "tx computes dt = softplus(dt + dt_bias) "
                    "unclamped, i.e. time_step_limit=(0.0, inf).")
    for option, default in (("use_bias", False), ("use_conv_bias", True),
                            ("hidden_act", "silu")):
        if hf.get(option, default) != default:
            unsupported(option, hf[option], f"tx's Mamba-2 layer maps {option}={default!r} "
                        "only.")
    kinds = hf.get("layer_types")
    if kinds is not None and set(kinds) - {"mamba"}:
        unsupported("layer_types", kinds, "tx maps Mamba-2 layers ('mamba') only here; "
                    "build hybrids with layer_pattern (e.g. mamba2,mamba2,mamba2,full).")
    hidden, expand = hf["hidden_size"], hf.get("expand", 2)
    if hf["num_heads"] * hf["head_dim"] != expand * hidden:
        unsupported("num_heads", hf["num_heads"], f"num_heads * head_dim = "
                    f"{hf['num_heads'] * hf['head_dim']} must equal expand * hidden_size = "
                    f"{expand * hidden}, as the mixer's inner width.")


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    _check_options(hf)
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    spec = Mamba2(chunk=_CHUNK, state=hf["state_size"], expand=hf.get("expand", 2),
                  groups=hf.get("n_groups", 1), conv=hf.get("conv_kernel", 4), norm_eps=eps)
    heads = hf["num_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(num_heads=heads, num_kv_heads=heads,
                                  head_dim=hf["head_dim"], masks=(spec,)),
        positions=NoPositions(), mlp=NoMLP(), norm=RMSNorm(eps),
        head=LMHead(tie=bool(hf.get("tie_word_embeddings", False))))


def model_type(cfg: ModelConfig) -> str | None:
    """``mamba2`` when every layer is Mamba-2 in blocks without an MLP."""
    ok = (isinstance(cfg.mlp, NoMLP) and isinstance(cfg.head, LMHead) and plain_body(cfg)
          and all(type(m) is Mamba2 for m in cfg.attention.masks) and cfg.norm.pre)
    return "mamba2" if ok else None


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    spec = cfg.attention.masks[0]
    _, heads = spec.dims(cfg)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                num_hidden_layers=cfg.num_layers, num_heads=heads, head_dim=cfg.head_dim,
                state_size=spec.state, expand=spec.expand, n_groups=spec.groups,
                conv_kernel=spec.conv, layer_norm_epsilon=spec.norm_eps, use_bias=False,
                use_conv_bias=True, hidden_act="silu", tie_word_embeddings=cfg.head.tie,
                architectures=["Mamba2ForCausalLM"])


def _conv(key, param):
    """torch depthwise ``[C, 1, W]`` <-> tx ``[W, C]``."""
    return one(key, param, lambda w: np.ascontiguousarray(w[:, 0, :].T),
               lambda w: np.ascontiguousarray(w.T[:, None, :]))


def entries(model, model_type: str):
    tower = model.tower
    out = [one("backbone.embeddings.weight", tower.embed.table_vd),
           one("backbone.norm_f.weight", tower.final_norm.scale)]
    if not model.config.head.tie:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, mixer = f"backbone.layers.{i}.", block.self_attn
        if not isinstance(mixer, Mamba2Layer):
            raise TypeError(f"layer {i} is {type(mixer).__name__}; model_type='mamba2' "
                             "holds Mamba-2 layers only.")
        m = p + "mixer."
        out += [one(p + "norm.weight", block.norms[0].scale),
                linear(m + "in_proj.weight", mixer.in_proj_dz),
                _conv(m + "conv1d.weight", mixer.conv_wc),
                one(m + "conv1d.bias", mixer.conv_bias_c),
                one(m + "dt_bias", mixer.dt_bias_h), one(m + "A_log", mixer.a_log_h),
                one(m + "D", mixer.d_skip_h), one(m + "norm.weight", mixer.norm_e),
                linear(m + "out_proj.weight", mixer.out_proj_ed)]
    return out


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return ("lm_head.weight",) if cfg.head.tie else ()


def prepare(tensors: dict, model_type: str) -> dict:
    return tensors


register_family(__name__)
