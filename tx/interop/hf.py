"""Hugging Face checkpoints <-> tx models, without PyTorch.

``load(path)`` reads ``config.json`` and the ``*.safetensors`` weights (one file or a sharded
``model.safetensors.index.json``) of a local checkpoint directory as numpy and returns a tx
model; ``save(model, path)`` writes a tx model of a supported family back in that format, so
``transformers``' ``from_pretrained`` loads it. ``config_from_hf`` alone maps a ``config.json``
dict to a ``ModelConfig``.

Families: ``llama``, ``mistral`` (sliding window -> tx ``local`` pattern, ``Local(W - 1)``),
``gpt2``. A config option tx cannot reproduce raises a ``ValueError`` naming the option, rather
than loading a model that computes something else.

Layouts. HF linear weights are ``[out, in]`` (torch ``nn.Linear``), except GPT-2's ``Conv1D``
which stores ``[in, out]``. tx keeps attention projections per head: ``q [D, N, H]``,
``k/v [D, K, H]``, ``o [N, H, D]``; HF's flattened head axis is head-major (``n * H + h``), so
the mapping is a transpose and a reshape. RoPE uses the rotate-half convention in both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx import models
from tx.config import ModelConfig

MODEL_TYPES = ("llama", "mistral", "gpt2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "gpt2": "GPT2LMHeadModel"}
# Buffers some checkpoints carry that hold no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def _unsupported(option: str, value: Any, why: str) -> None:
    raise ValueError(f"unsupported Hugging Face config option {option}={value!r}: {why}")


# -- config.json -> ModelConfig -----------------------------------------------------------------
def _rope_theta(hf: dict) -> float:
    """RoPE base from ``rope_parameters`` (transformers >= 5) or ``rope_theta``/``rope_scaling``
    (older files); only unscaled RoPE is supported."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for option, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not spec:
            continue
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            _unsupported(f"{option}.rope_type", kind, "tx implements only unscaled RoPE "
                         "('default'); convert without scaling or add the variant to tx.")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def _llama_like(hf: dict, model_type: str) -> dict:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _unsupported("hidden_act", act, "LLaMA-style MLPs are loaded as SwiGLU (silu only).")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // num_heads:
        head_dim = None  # implicit, as tx configs leave it
    fields = dict(
        family="decoder", task="lm", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
        d_ff=hf["intermediate_size"], activation="swiglu", norm="rmsnorm", pre_norm=True,
        positions="rope", max_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention="causal",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_base=_rope_theta(hf),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)))
    if model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None:
            # HF: key j visible to query i iff i - W < j <= i, i.e. W keys: tx Local(W - 1).
            fields.update(attention="local", window=int(window))
    if hf.get("layer_types") and any(t != hf["layer_types"][0] for t in hf["layer_types"]):
        _unsupported("layer_types", hf["layer_types"], "per-layer attention types are not "
                     "mapped yet; use a uniform config.")
    return fields


def _gpt2(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        _unsupported("activation_function", act, "tx's 'gelu' is the tanh approximation "
                     "(gelu_new); exact gelu/relu GPT-2 variants are not mapped.")
    for option, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if option in hf and bool(hf[option]) != ok:
            _unsupported(option, hf[option], f"tx's GPT-2 mapping needs {option}={ok}.")
    d = hf["n_embd"]
    return dict(family="decoder", task="lm", vocab_size=hf["vocab_size"], d_model=d,
                num_layers=hf["n_layer"], num_heads=hf["n_head"],
                d_ff=hf.get("n_inner") or 4 * d, activation="gelu", norm="layernorm",
                pre_norm=True, positions="learned", max_len=hf["n_positions"],
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention="causal",
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), attention_bias=True,
                mlp_bias=True)


def config_from_hf(hf: dict | str | os.PathLike, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a ``config.json`` dict (or a checkpoint directory / file path).

    ``overrides`` set tx fields afterwards (e.g. ``implementation=("pallas", "xla")``).
    """
    if not isinstance(hf, dict):
        path = os.fspath(hf)
        with open(os.path.join(path, "config.json") if os.path.isdir(path) else path) as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        _unsupported("model_type", model_type, f"tx loads {MODEL_TYPES}.")
    arch = hf.get("architectures") or [_ARCHITECTURES[model_type]]
    if arch[0] != _ARCHITECTURES[model_type]:
        _unsupported("architectures", arch, f"only the LM head "
                     f"{_ARCHITECTURES[model_type]} is mapped for {model_type}.")
    fields = _gpt2(hf) if model_type == "gpt2" else _llama_like(hf, model_type)
    fields.update(overrides)
    return ModelConfig(**fields)


def model_type_of(cfg: ModelConfig) -> str:
    """The HF ``model_type`` a tx config corresponds to; ValueError when none does."""
    if cfg.family != "decoder" or cfg.layer_pattern:
        _unsupported("family", cfg.family, "only uniform decoder-only LMs are saved.")
    pattern = cfg._split_attention()[1]
    if (cfg.norm, cfg.activation, cfg.positions) == ("rmsnorm", "swiglu", "rope") and \
            cfg.pre_norm:
        if pattern == "local":
            return "mistral"
        if pattern in (None, "full", "causal"):
            return "llama"
        _unsupported("attention", cfg.attention, "no HF LLaMA/Mistral equivalent.")
    if (cfg.norm, cfg.activation, cfg.positions) == ("layernorm", "gelu", "learned") and \
            cfg.pre_norm and cfg.attention_bias and cfg.mlp_bias and \
            pattern in (None, "full", "causal") and cfg.kv_heads == cfg.num_heads:
        return "gpt2"
    raise ValueError("this tx config has no supported Hugging Face equivalent (LLaMA: rmsnorm, "
                     "swiglu, rope; Mistral: the same with a local pattern; GPT-2: layernorm, "
                     "gelu, learned positions, biases, MHA).")


def hf_config_from(cfg: ModelConfig) -> dict:
    """The ``config.json`` dict for a tx config (inverse of ``config_from_hf``)."""
    model_type = model_type_of(cfg)
    if model_type == "gpt2":
        if cfg.head_size * cfg.num_heads != cfg.d_model:
            _unsupported("head_dim", cfg.head_dim, "GPT-2 needs head_dim * num_heads == d_model.")
        return dict(model_type="gpt2", architectures=[_ARCHITECTURES["gpt2"]],
                    vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                    n_head=cfg.num_heads, n_inner=cfg.d_ff, n_positions=cfg.max_len,
                    activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    tie_word_embeddings=cfg.tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, dtype="float32")
    hf = dict(model_type=model_type, architectures=[_ARCHITECTURES[model_type]],
              vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
              head_dim=cfg.head_size, hidden_act="silu", max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              rope_theta=cfg.rope_base,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
              attention_dropout=0.0, dtype="float32")
    if model_type == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    else:
        if cfg.attention_bias or cfg.mlp_bias:
            _unsupported("attention_bias", True, "Mistral has no projection biases.")
        hf.update(sliding_window=cfg.window)
    return hf


# -- weights -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _Entry:
    """One HF tensor <-> one or more tx parameters."""

    key: str
    params: tuple[nnx.Param, ...]
    to_tx: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _one(key, param, to_tx=lambda w: w, to_hf=lambda w: w) -> _Entry:
    return _Entry(key, (param,), lambda w: (to_tx(w),), to_hf)


def _linear(key, param) -> _Entry:
    """torch Linear ``[out, in]`` <-> flax Linear kernel ``[in, out]``."""
    return _one(key, param, lambda w: w.T, lambda w: w.T)


def _heads_in(key, param, n, h) -> _Entry:
    """torch ``[N*H, D]`` (or bias ``[N*H]``) <-> tx ``[D, N, H]`` (or ``[N, H]``)."""
    def to_tx(w):
        return w.reshape(n, h) if w.ndim == 1 else w.T.reshape(-1, n, h)
    return _one(key, param, to_tx, lambda w: w.reshape(n * h) if w.ndim == 2 else
                w.reshape(w.shape[0], n * h).T)


def _llama_entries(model, cfg: ModelConfig) -> list[_Entry]:
    tower = model.tower
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.head_size
    out = [_one("model.embed_tokens.weight", tower.embed.table_vd),
           _one("model.norm.weight", tower.final_norm.scale)]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, attn, mlp = f"model.layers.{i}.", block.self_attn, block.mlp
        out += [_heads_in(p + "self_attn.q_proj.weight", attn.q_dnh, n, h),
                _heads_in(p + "self_attn.k_proj.weight", attn.k_dkh, k, h),
                _heads_in(p + "self_attn.v_proj.weight", attn.v_dkh, k, h),
                _one(p + "self_attn.o_proj.weight", attn.o_nhd,
                     lambda w: w.T.reshape(n, h, -1), lambda w: w.reshape(n * h, -1).T),
                _linear(p + "mlp.gate_proj.weight", mlp.wi_gate.kernel),
                _linear(p + "mlp.up_proj.weight", mlp.wi_up.kernel),
                _linear(p + "mlp.down_proj.weight", mlp.wo.kernel),
                _one(p + "input_layernorm.weight", block.norms[0].scale),
                _one(p + "post_attention_layernorm.weight", block.norms[1].scale)]
        if cfg.attention_bias:
            out += [_heads_in(p + "self_attn.q_proj.bias", attn.q_bias_nh, n, h),
                    _heads_in(p + "self_attn.k_proj.bias", attn.k_bias_kh, k, h),
                    _heads_in(p + "self_attn.v_proj.bias", attn.v_bias_kh, k, h),
                    _one(p + "self_attn.o_proj.bias", attn.o_bias_d)]
        if cfg.mlp_bias:
            out += [_one(p + "mlp.gate_proj.bias", mlp.wi_gate.bias),
                    _one(p + "mlp.up_proj.bias", mlp.wi_up.bias),
                    _one(p + "mlp.down_proj.bias", mlp.wo.bias)]
    return out


def _gpt2_entries(model, cfg: ModelConfig) -> list[_Entry]:
    tower = model.tower
    n, h, d = cfg.num_heads, cfg.head_size, cfg.d_model
    out = [_one("transformer.wte.weight", tower.embed.table_vd),
           _one("transformer.wpe.weight", tower.learned.table),
           _one("transformer.ln_f.weight", tower.final_norm.scale),
           _one("transformer.ln_f.bias", tower.final_norm.bias)]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", model.head.proj.kernel))
    for i, block in enumerate(tower.blocks):
        p, attn, mlp = f"transformer.h.{i}.", block.self_attn, block.mlp
        qkv = (attn.q_dnh, attn.k_dkh, attn.v_dkh)
        qkv_bias = (attn.q_bias_nh, attn.k_bias_kh, attn.v_bias_kh)
        out += [  # Conv1D stores [in, out]; c_attn's out axis is q | k | v, each head-major.
            _Entry(p + "attn.c_attn.weight", qkv,
                   lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
                   lambda *ws: np.concatenate([x.reshape(d, n * h) for x in ws], axis=1)),
            _Entry(p + "attn.c_attn.bias", qkv_bias,
                   lambda w: tuple(x.reshape(n, h) for x in np.split(w, 3)),
                   lambda *ws: np.concatenate([x.reshape(n * h) for x in ws])),
            _one(p + "attn.c_proj.weight", attn.o_nhd, lambda w: w.reshape(n, h, d),
                 lambda w: w.reshape(n * h, d)),
            _one(p + "attn.c_proj.bias", attn.o_bias_d),
            _one(p + "mlp.c_fc.weight", mlp.wi_gate.kernel),
            _one(p + "mlp.c_fc.bias", mlp.wi_gate.bias),
            _one(p + "mlp.c_proj.weight", mlp.wo.kernel),
            _one(p + "mlp.c_proj.bias", mlp.wo.bias),
            _one(p + "ln_1.weight", block.norms[0].scale),
            _one(p + "ln_1.bias", block.norms[0].bias),
            _one(p + "ln_2.weight", block.norms[1].scale),
            _one(p + "ln_2.bias", block.norms[1].bias)]
    return out


def _entries(model) -> list[_Entry]:
    cfg = model.config
    return _gpt2_entries(model, cfg) if model_type_of(cfg) == "gpt2" else \
        _llama_entries(model, cfg)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded index) as numpy."""
    from safetensors.numpy import load_file
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor "
                                "model.safetensors.index.json.")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _strip_prefix(tensors: dict[str, np.ndarray], model_type: str) -> dict[str, np.ndarray]:
    """Accepts bare base-model checkpoints (``GPT2Model``: no ``transformer.`` prefix)."""
    if model_type == "gpt2" and "wte.weight" in tensors:
        return {f"transformer.{k}": v for k, v in tensors.items()}
    return tensors


def load_weights(model, tensors: dict[str, np.ndarray]) -> None:
    """Copies HF-named ``tensors`` into ``model`` in place; every tensor must be used."""
    tensors = _strip_prefix(dict(tensors), model_type_of(model.config))
    used = set()
    for entry in _entries(model):
        if entry.key not in tensors:
            raise KeyError(f"checkpoint lacks tensor {entry.key!r}.")
        values = entry.to_tx(np.asarray(tensors[entry.key], np.float32))
        used.add(entry.key)
        for param, value in zip(entry.params, values):
            if tuple(param[...].shape) != tuple(value.shape):
                raise ValueError(f"tensor {entry.key!r}: shape {value.shape} does not fit the "
                                 f"tx parameter's {param[...].shape}.")
            param.set_value(jnp.asarray(value, dtype=param[...].dtype))
    if model.config.tie_embeddings:
        used.add("lm_head.weight")  # tied copies some checkpoints still carry
    extra = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ValueError(f"checkpoint tensors {extra[:5]}{'...' if len(extra) > 5 else ''} "
                         "have no place in the tx model: an unsupported option is in use.")


def load(path: str | os.PathLike, *, seed: int = 0, **overrides) -> nnx.Module:
    """A tx model with the weights of the HF checkpoint directory ``path``."""
    cfg = config_from_hf(path, **overrides)
    model = models.build(cfg, seed=seed)
    load_weights(model, read_safetensors(path))
    return model


def state_dict(model) -> dict[str, np.ndarray]:
    """The model's parameters under HF names, in HF layouts (numpy, fp32)."""
    out = {}
    for entry in _entries(model):
        out[entry.key] = np.ascontiguousarray(
            entry.to_hf(*(np.asarray(p[...], np.float32) for p in entry.params)))
    return out


def save(model, path: str | os.PathLike, *, extra_config: dict | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` for ``transformers``' from_pretrained."""
    from safetensors.numpy import save_file
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    hf = hf_config_from(model.config)
    hf.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file(state_dict(model), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


__all__: Sequence[str] = ("MODEL_TYPES", "config_from_hf", "hf_config_from", "load",
                          "load_weights", "model_type_of", "read_safetensors", "save",
                          "state_dict")
