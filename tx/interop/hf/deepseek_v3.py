"""DeepSeek-V3 (``DeepseekV3ForCausalLM``) with every layer dense: multi-head latent attention
(``tx.attention.mla.MLA``, built as ``MLAttention``), a SwiGLU MLP, RMSNorm, RoPE.

A checkpoint whose layers from ``first_k_dense_replace`` on hold routed experts (mixture of
experts) is refused by name: tx has no MoE yet. So is any option tx would silently compute
differently (projection biases, another activation).

Layouts (N heads, D d_model, r = kv_lora_rank, rq = q_lora_rank, dn/dr/dv = nope, rope and
value head dims; torch Linear weights are ``[out, in]``, head-major on the out axis):

* ``q_proj [N*(dn+dr), D]`` -> ``q_dnh [D, N, dn+dr]``; with q compression ``q_a_proj [rq, D]``
  -> ``q_a_dr``, ``q_a_layernorm`` -> ``q_a_norm``, ``q_b_proj [N*(dn+dr), rq]`` -> ``q_b_rnh``;
* ``kv_a_proj_with_mqa [r+dr, D]`` -> ``kv_a_dr [D, r+dr]`` (the latent, then the shared RoPE
  key), ``kv_a_layernorm`` -> ``kv_a_norm``;
* ``kv_b_proj [N*(dn+dv), r]``: per head dn rows of the key, then dv rows of the value ->
  ``k_b_rnh [r, N, dn]`` and ``v_b_rnh [r, N, dv]``;
* ``o_proj [D, N*dv]`` -> ``o_nhd [N, dv, D]``.

RoPE. ``rope_interleave`` (DeepSeek's default) rotates the pairs ``(x0, x1), (x2, x3)...`` of
each rope part; tx rotates ``x_i`` with ``x_{i+dr/2}``. Reading the even dimensions first and
the odd ones after (a fixed permutation of the rope columns of q and of the shared key) turns
one into the other, and since q and k are permuted alike their dot product is unchanged: the
permutation is applied to the weights at load, and undone at save (which writes
``rope_interleave: true``, as DeepSeek's checkpoints do). YaRN scaling (``rope_parameters``
with ``rope_type: yarn``) maps to ``tx.layers.RopeScaling`` over the dr rope dims; its
``mscale_all_dim`` multiplies the logits scale ``(dn+dr)**-0.5`` by ``mscale**2``, which tx
holds as ``attention.scale``.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from tx.attention.mla import MLA
from tx.config import AttentionConfig, ModelConfig
from tx.interop.hf import decoders
from tx.interop.hf.common import (Entry, check_architecture, heads_in, heads_out, linear, one,
                                  plain_body, register_family, unsupported)
from tx.layers import MLPConfig, RMSNorm, RoPE
from tx.models.heads import LMHead

ARCHITECTURES = {"deepseek_v3": {"DeepseekV3ForCausalLM": LMHead}}


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _check_options(hf: dict) -> None:
    layers = hf["num_hidden_layers"]
    dense_until = hf.get("first_k_dense_replace", 3)  # transformers' default
    dense_until = layers if dense_until is None else dense_until
    if dense_until < layers:
        unsupported("first_k_dense_replace", dense_until, f"layers {dense_until}.."
                    f"{layers - 1} of this checkpoint hold routed experts (n_routed_experts="
                    f"{hf.get('n_routed_experts', 256)}), and tx has no mixture-of-experts "
                    f"yet; only checkpoints with every layer dense (first_k_dense_replace >= "
                    f"num_hidden_layers={layers}) load.")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported("hidden_act", hf["hidden_act"], "DeepSeek-V3's MLP is loaded as SwiGLU "
                    "(silu only).")
    if hf.get("attention_bias"):
        unsupported("attention_bias", hf["attention_bias"], "tx's MLA layer has no projection "
                    "biases; convert the checkpoint without them.")
    # num_key_value_heads is not read: MLA expands its one latent to every head (DeepSeek's
    # files give it equal to num_attention_heads; transformers' default is 128 whatever the
    # heads).
    if float(hf.get("rms_norm_eps", 1e-6)) != 1e-6:
        # transformers builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps;
        # tx's MLA builds them with the model's norm.
        unsupported("rms_norm_eps", hf["rms_norm_eps"], "DeepSeek-V3's latent norms use eps "
                    "1e-6 whatever rms_norm_eps says, and tx's MLA layer uses the model's; "
                    "only rms_norm_eps=1e-6 (DeepSeek's own) loads exactly.")
    quant = hf.get("quantization_config")
    if quant:  # DeepSeek's own release is block-wise fp8 with per-block scale tensors
        unsupported("quantization_config", quant.get("quant_method", quant) if
                    isinstance(quant, dict) else quant, "tx reads unquantised weights; "
                    "dequantise the checkpoint to bf16 or fp32 first.")
    if hf.get("q_lora_rank") == 0:
        unsupported("q_lora_rank", 0, "give null for no q compression, or a positive rank.")


def _mscale(spec: dict) -> float:
    """DeepSeek's YaRN logits gain ``(0.1 mscale_all_dim ln(factor) + 1)**2`` (1 without)."""
    factor, all_dim = float(spec.get("factor") or 1.0), spec.get("mscale_all_dim") or 0.0
    if factor <= 1 or not all_dim:
        return 1.0
    return (0.1 * float(all_dim) * math.log(factor) + 1.0) ** 2


def _rope_spec(hf: dict) -> dict:
    """The one RoPE spec in force: ``rope_parameters`` (transformers >= 5) or ``rope_scaling``."""
    for option in ("rope_parameters", "rope_scaling"):
        spec = hf.get(option) or {}
        if spec.get("rope_type", spec.get("type", "default")) != "default":
            return spec
    return {}


def config(hf: dict, model_type: str) -> ModelConfig:
    check_architecture(hf, model_type, ARCHITECTURES[model_type])
    _check_options(hf)
    dn, dr = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64)
    theta, scaling = decoders._rope(hf)  # the MLA layer turns its dr rope dims by it
    spec = MLA(kv_lora_rank=hf.get("kv_lora_rank", 512), qk_rope_head_dim=dr,
               qk_nope_head_dim=dn, v_head_dim=hf.get("v_head_dim") or 128,
               q_lora_rank=hf.get("q_lora_rank"))
    gain = _mscale(_rope_spec(hf))
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    # head_dim does not apply to MLA layers; it is set only where the implicit d_model / N
    # would not build (the tower's own RoPE needs an even width).
    head_dim = None if d % n == 0 and d // n % 2 == 0 else dr
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
        attention=AttentionConfig(num_heads=n, num_kv_heads=n, head_dim=head_dim, masks=(spec,),
                                  scale=None if gain == 1.0 else (dn + dr) ** -0.5 * gain),
        positions=RoPE(theta, scaling, hf.get("max_position_embeddings", 4096)),
        mlp=MLPConfig(hf["intermediate_size"], jax.nn.silu, gated=True, bias=False),
        norm=RMSNorm(float(hf.get("rms_norm_eps", 1e-6))),
        head=LMHead(tie=bool(hf.get("tie_word_embeddings", False))))


def _spec(cfg: ModelConfig) -> MLA | None:
    """The one MLA value every layer uses, or None."""
    found = set(cfg.attention.masks)
    spec = found.pop() if len(found) == 1 else None
    return spec if type(spec) is MLA else None


def model_type(cfg: ModelConfig) -> str | None:
    """``deepseek_v3`` for a LLaMA-bodied decoder (RMSNorm, RoPE, SwiGLU, no biases) whose
    layers are all the same MLA."""
    if _spec(cfg) is None:
        return None
    a, mlp, head = cfg.attention, cfg.mlp, cfg.head
    body = (isinstance(head, LMHead) and plain_body(cfg) and not head.bias and
            head.scale == 1.0 and cfg.norm.pre and isinstance(cfg.norm, RMSNorm) and
            type(cfg.positions) is RoPE and (mlp.activation, mlp.gated) == (jax.nn.silu, True))
    if not body:
        return None
    for option, on in (("attention.bias", a.bias), ("attention.out_bias", a.out_bias),
                       ("mlp.bias", mlp.bias)):
        if on:
            unsupported(option, on, "DeepSeek-V3's projections have no biases here; set it "
                        "False.")
    scaling = cfg.positions.scaling
    if a.scale is not None and (scaling is None or scaling.kind != "yarn" or
                                scaling.factor <= 1):
        unsupported("attention.scale", a.scale, "DeepSeek-V3 scales logits by "
                    "(qk_nope_head_dim + qk_rope_head_dim) ** -0.5, changed only by YaRN's "
                    "mscale_all_dim; leave it None or use YaRN RoPE scaling (factor > 1).")
    if cfg.norm.eps != 1e-6:  # transformers' latent norms keep 1e-6 (see _check_options)
        unsupported("norm.eps", cfg.norm.eps, "DeepSeek-V3's latent norms use eps 1e-6 "
                    "whatever rms_norm_eps says; set norm eps to 1e-6.")
    return "deepseek_v3"


def hf_config(cfg: ModelConfig, model_type: str) -> dict:
    spec = _spec(cfg)
    max_len = cfg.positions.trained_len or 4096
    rope = decoders._rope_parameters(cfg, max_len)
    if cfg.attention.scale is not None:  # YaRN's logits gain, as mscale_all_dim
        gain = cfg.attention.scale / (spec.qk_nope_head_dim + spec.qk_rope_head_dim) ** -0.5
        rope.update(mscale_all_dim=(math.sqrt(gain) - 1) / (0.1 * math.log(rope["factor"])))
    layers = cfg.num_layers
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                intermediate_size=cfg.mlp.d_ff, num_hidden_layers=layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                kv_lora_rank=spec.kv_lora_rank, q_lora_rank=spec.q_lora_rank,
                qk_rope_head_dim=spec.qk_rope_head_dim, qk_nope_head_dim=spec.qk_nope_head_dim,
                v_head_dim=spec.v_head_dim, first_k_dense_replace=layers,
                num_nextn_predict_layers=0, hidden_act="silu", max_position_embeddings=max_len,
                rms_norm_eps=cfg.norm.eps, tie_word_embeddings=cfg.head.tie,
                rope_parameters=rope, rope_interleave=True, attention_bias=False,
                attention_dropout=0.0)


# -- weights -----------------------------------------------------------------------------------
def _interleaved(dr: int) -> tuple[np.ndarray, np.ndarray]:
    """(to tx, to HF): the rope columns' order from DeepSeek's interleaved pairs to tx's
    halves (even dimensions, then odd), and back."""
    to_tx = np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])
    return to_tx, np.argsort(to_tx)


def _rope_cols(w: np.ndarray, dr: int, order: np.ndarray) -> np.ndarray:
    """``w`` with its last ``dr`` columns (the rope part, last axis) reordered."""
    return np.concatenate([w[..., :-dr], w[..., -dr:][..., order]], axis=-1)


def _q_heads(key: str, param, n: int, dn: int, dr: int, order) -> Entry:
    """torch ``[N*(dn+dr), in]`` <-> tx ``[in, N, dn+dr]``, each head's rope part reordered."""
    base = heads_in(key, param, n, dn + dr)
    to_tx, to_hf = order
    return one(key, param, lambda w: _rope_cols(base.to_tx(w)[0], dr, to_tx),
               lambda w: base.to_hf(_rope_cols(w, dr, to_hf)))


def _attention(prefix: str, attn, spec: MLA, n: int, interleave: bool) -> list[Entry]:
    r, dn, dr, dv = (spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim,
                     spec.v_head_dim)
    order = _interleaved(dr) if interleave else (np.arange(dr), np.arange(dr))
    if spec.q_lora_rank is None:
        out = [_q_heads(prefix + "q_proj.weight", attn.q_dnh, n, dn, dr, order)]
    else:
        out = [linear(prefix + "q_a_proj.weight", attn.q_a_dr),
               one(prefix + "q_a_layernorm.weight", attn.q_a_norm.scale),
               _q_heads(prefix + "q_b_proj.weight", attn.q_b_rnh, n, dn, dr, order)]

    def kv_b_to_tx(w):  # [N*(dn+dv), r] -> [r, N, dn+dv], split into k and v
        w_rnh = w.T.reshape(r, n, dn + dv)
        return w_rnh[..., :dn], w_rnh[..., dn:]

    return out + [
        one(prefix + "kv_a_proj_with_mqa.weight", attn.kv_a_dr,
            lambda w: _rope_cols(w.T, dr, order[0]), lambda w: _rope_cols(w, dr, order[1]).T),
        one(prefix + "kv_a_layernorm.weight", attn.kv_a_norm.scale),
        Entry(prefix + "kv_b_proj.weight", (attn.k_b_rnh, attn.v_b_rnh), kv_b_to_tx,
              lambda k, v: np.concatenate([k, v], axis=-1).reshape(r, -1).T),
        heads_out(prefix + "o_proj.weight", attn.o_nhd, n, dv)]


def entries(model, model_type: str, *, interleave: bool = True) -> list[Entry]:
    cfg, tower = model.config, model.tower
    spec = _spec(cfg)
    out = [one("model.embed_tokens.weight", tower.embed.table_vd),
           one("model.norm.weight", tower.final_norm.scale)]
    if not cfg.head.tie:
        out.append(linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, mlp = f"model.layers.{i}.", block.mlp
        out += _attention(p + "self_attn.", block.self_attn, spec, cfg.num_heads, interleave)
        out += [linear(p + "mlp.gate_proj.weight", mlp.wi_gate.kernel),
                linear(p + "mlp.up_proj.weight", mlp.wi_up.kernel),
                linear(p + "mlp.down_proj.weight", mlp.wo.kernel),
                one(p + "input_layernorm.weight", block.norms[0].scale),
                one(p + "post_attention_layernorm.weight", block.norms[1].scale)]
    return out


def ignored(cfg: ModelConfig, model_type: str) -> tuple[str, ...]:
    return decoders.ignored(cfg, model_type)


def canonical_tensors(hf: dict, tensors: dict) -> dict:
    """``tensors`` in the interleaved RoPE layout ``entries`` reads: a checkpoint written with
    ``rope_interleave: false`` rotates halves already, so its rope rows are put in the
    interleaved order here (``tx.interop.hf.load`` calls this with the checkpoint's
    config.json)."""
    if hf.get("rope_interleave", True):
        return tensors
    n, dn, dr = (hf["num_attention_heads"], hf.get("qk_nope_head_dim", 128),
                 hf.get("qk_rope_head_dim", 64))
    to_hf = _interleaved(dr)[1]
    out = dict(tensors)
    for key, w in tensors.items():
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            heads = w.reshape(n, dn + dr, -1)  # [N, dn+dr, in]: reorder each head's rope rows
            out[key] = np.concatenate([heads[:, :dn], heads[:, dn:][:, to_hf]],
                                      axis=1).reshape(w.shape)
        elif key.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            out[key] = np.concatenate([w[:-dr], w[-dr:][to_hf]])
    return out


def prepare(tensors: dict, model_type: str) -> dict:
    """Drops the multi-token-prediction modules (``model.layers.{L}.*`` after the last layer,
    recognised by their ``eh_proj``): transformers does not run them in the causal LM
    either."""
    mtp = {key[:-len("eh_proj.weight")] for key in tensors if key.endswith(".eh_proj.weight")}
    return {k: v for k, v in tensors.items() if not any(k.startswith(p) for p in mtp)}


register_family(__name__)
