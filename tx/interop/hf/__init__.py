"""Hugging Face checkpoints <-> tx models, without PyTorch.

``load(path)`` reads ``config.json`` and the ``*.safetensors`` weights (one file or a sharded
``model.safetensors.index.json``) of a local checkpoint directory as numpy and returns a tx
model; ``save(model, path)`` writes a tx model of a supported family back in that format, so
``transformers``' ``from_pretrained`` loads it. ``config_from_hf`` alone maps a ``config.json``
dict to a ``ModelConfig``.

Families, one module each: ``decoders`` (``llama`` with RoPE scaling, ``mistral``, ``gpt2``),
``qwen2`` (LLaMA with q/k/v biases, optional sliding-window layers), ``phi3`` (LLaMA with fused
``qkv_proj`` and ``gate_up_proj``), ``gemma2`` (soft-capped logits, sandwich norms,
alternating sliding-window layers), ``bert`` (masked LM, sequence classification), ``t5``
(conditional generation), ``qwen3`` (Qwen2 with per-head q/k norms), ``gemma3`` (Gemma 2 with
q/k norms and a RoPE base per layer type), ``fnet`` (Fourier token mixing, masked LM),
``funnel`` (Funnel Transformer: pooled blocks and an upsampling decoder, masked LM),
``deepseek_v3`` (every layer dense: multi-head latent attention, ``tx.attention.mla``). A
config option tx cannot reproduce raises a ``ValueError`` naming the option, rather than
loading a model that computes something else. Layouts are described in
``common.py``, and so is a family: a module that maps ``config.json`` straight to a
``ModelConfig`` and back, and registers its model types in :data:`FAMILIES` itself.

A Phi-3 model is a LLaMA (or Mistral) model in tx: ``save`` writes it as one unless told
``model_type="phi3"``, which writes Phi-3's fused layout.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tx import flags, models
from tx.attention import patterns
from tx.config import ModelConfig
from tx.interop.hf.common import FAMILIES, unsupported

# Each family registers its model types in FAMILIES when imported, in this order (a family
# that imports another registers after it: phi3 after decoders). A new family is its own
# file, named here or imported by research code (tx.interop.hf.common describes a family).
# isort: off
from tx.interop.hf import decoders, qwen2, phi3, gemma2, bert, t5, qwen3, gemma3, fnet  # noqa: F401
from tx.interop.hf import funnel  # noqa: F401,E402  (Funnel Transformer, masked LM)
from tx.interop.hf import deberta_v2  # noqa: F401,E402  (DeBERTa-v2/v3, masked LM)
from tx.interop.hf import mamba2  # noqa: F401,E402  (Mamba-2 SSD, causal LM)
from tx.interop.hf import deepseek_v3  # noqa: F401,E402  (DeepSeek-V3 dense, MLA)
# isort: on


def __getattr__(name: str):
    if name == "MODEL_TYPES":  # every registered model_type, research families included
        return FAMILIES.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _family(model_type: str):
    if model_type not in FAMILIES:
        unsupported("model_type", model_type, f"tx loads {FAMILIES.names()}; register another "
                    f"family with {FAMILIES.register_hint}.")
    return FAMILIES[model_type]


def _families() -> list:
    """The family modules, once each, in registration order."""
    return list(dict.fromkeys(module for _, module in FAMILIES.items()))


# -- config.json <-> ModelConfig ---------------------------------------------------------------
def _read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; a malformed file raises a ValueError naming it and where
    the parser stopped (``json``'s own error names neither the file nor the fix)."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} is not valid JSON ({e.msg} at line {e.lineno}, column "
                             f"{e.colno}): fix or re-export the {what}.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds a JSON {type(data).__name__}, not an object: the "
                         f"{what} must be a JSON object.")
    return data


def _read_config(hf: dict | str | os.PathLike) -> dict:
    if isinstance(hf, dict):
        return hf
    path = os.fspath(hf)
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    return _read_json(path, "checkpoint's config.json (e.g. with transformers' save_pretrained)")


def _overridden(printed: dict, overrides: dict) -> dict:
    """The checkpoint's flags (``printed``) with ``overrides`` on top. An override that names
    the heads (``num_kv_heads``, or a preset in ``attention``) or the pattern (a pattern in
    ``attention``, or ``layer_pattern``) replaces the checkpoint's, whichever flag spelled it;
    an ``attention`` override without a pattern keeps the checkpoint's pattern."""
    spelled = overrides.get("attention")
    preset, pattern = patterns.split_attention(spelled) if isinstance(spelled, str) else \
        (None, None)
    out = dict(printed)
    if preset is not None:
        out.pop("num_kv_heads", None)
    if pattern is not None or "layer_pattern" in overrides:
        out.pop("attention", None)
        out.pop("layer_pattern", None)
    out.update(overrides)
    if isinstance(spelled, str) and pattern is None and "layer_pattern" not in overrides:
        _, kept = patterns.split_attention(printed.get("attention", ""))
        out["attention"] = "+".join(p for p in (preset, kept) if p)
    return out


def _config(hf: dict, tensors: dict | None = None, **overrides) -> ModelConfig:
    model_type = hf.get("model_type")
    family = _family(model_type)
    cfg = family.config(hf, model_type)
    if tensors is not None and hasattr(family, "with_tensors"):  # T5's tying
        cfg = family.with_tensors(cfg, tensors)
    if not overrides:
        return cfg
    return flags.model_config(**_overridden(flags.to_flags(cfg), overrides))


def config_from_hf(hf: dict | str | os.PathLike, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a ``config.json`` dict (or a checkpoint directory / file path).

    The family of its ``model_type`` maps ``config.json`` to values. ``overrides`` are model
    flags (``tx.flags``, e.g. ``implementation=("pallas", "xla")``, ``attention="local"``):
    they change the config's own flags (``tx.flags.to_flags``) before it is rebuilt.
    """
    return _config(_read_config(hf), **overrides)


def model_type_of(cfg: ModelConfig) -> str:
    """The HF ``model_type`` a tx config corresponds to; ValueError when none does."""
    for family in _families():
        found = family.model_type(cfg)
        if found is not None:
            return found
    raise ValueError("this tx config has no supported Hugging Face equivalent (LLaMA: rmsnorm, "
                     "swiglu, rope; Mistral: the same with a local pattern; GPT-2: layernorm, "
                     "gelu, learned positions, biases, MHA; Qwen2: LLaMA with q/k/v biases "
                     "and none on o; BERT: post-norm encoder with token types, embedding norm "
                     "and BERT heads; T5: encoder-decoder with t5 positions, rmsnorm, "
                     "attention_scale=1).")


def _resolve(cfg: ModelConfig, model_type: str | None, *, exact: bool = True) -> str:
    """``model_type`` when its family holds ``cfg``; None: the one ``cfg`` corresponds to.

    Not ``exact`` (loading): the family may hold ``cfg`` under another of its names, as a
    LLaMA checkpoint loaded with a local-attention override is a Mistral model.
    """
    if model_type is None:
        return model_type_of(cfg)
    claimed = _family(model_type).model_type(cfg)
    if claimed != model_type and (exact or claimed is None):
        try:
            instead = f"it saves as {model_type_of(cfg)!r} without model_type"
        except ValueError:
            instead = "no family holds it"
        raise ValueError(f"model_type={model_type!r} cannot hold this tx config ({instead}): "
                         f"leave model_type unset or build a {model_type}-shaped config.")
    return model_type


def hf_config_from(cfg: ModelConfig, *, model_type: str | None = None) -> dict:
    """The ``config.json`` dict for a tx config (inverse of ``config_from_hf``);
    ``model_type`` picks among families that hold the same config (``"phi3"`` over LLaMA)."""
    model_type = _resolve(cfg, model_type)
    family = _family(model_type)
    archs = {head: arch for arch, head in family.ARCHITECTURES[model_type].items()}
    hf = dict(model_type=model_type, architectures=[archs[type(cfg.head)]], dtype="float32")
    hf.update(family.hf_config(cfg, model_type))
    return hf


# -- weights -----------------------------------------------------------------------------------
def safetensors_files(path: str | os.PathLike) -> list[str]:
    """The ``*.safetensors`` files of a checkpoint directory (single file or sharded index)."""
    path = os.fspath(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index, "sharded checkpoint's index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index!r} has no \"weight_map\" object (tensor name -> shard "
                             "file): fix or re-export the sharded checkpoint.")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{index!r} lists shard {missing[0]!r}, which does not "
                                    "exist: copy every shard of the checkpoint.")
        return files
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor "
                            "model.safetensors.index.json.")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded index) as numpy."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    tensors: dict[str, np.ndarray] = {}
    for file in safetensors_files(path):
        try:
            tensors.update(load_file(file))
        except SafetensorError as e:  # its message names neither the file nor the fix
            raise ValueError(f"{file!r} is not a readable safetensors file ({e}): it may be "
                             "truncated; copy or re-export it.") from e
    return tensors


def _shape_error(entry, found: np.ndarray, source: str) -> ValueError:
    """``entry``'s tensor does not fit its tx parameters: name it, its shape and the HF shape
    the parameters imply (built from zeros, so only when there is an error to report)."""
    try:
        zeros = (np.zeros(p[...].shape, np.float32) for p in entry.params)
        expected = tuple(entry.to_hf(*zeros).shape)
    except ValueError:
        expected = "another shape"
    return ValueError(f"tensor {entry.key!r} in {source} has shape {found.shape} but the model "
                      f"built from config.json expects {expected}: the checkpoint and its "
                      "config.json disagree (check the sizes: hidden size, heads, layers, "
                      "vocab); re-export it or fix the config.")


def load_weights(model, tensors: dict[str, np.ndarray], *, source: str = "the tensors",
                 model_type: str | None = None) -> None:
    """Copies HF-named ``tensors`` into ``model`` in place; every tensor must be used.

    ``source`` says where the tensors came from (e.g. the files read), for error messages;
    ``model_type`` names their layout when several fit the config (``"phi3"``).
    """
    model_type = _resolve(model.config, model_type, exact=False)
    family = _family(model_type)
    tensors = family.prepare(dict(tensors), model_type)
    used = set()
    for entry in family.entries(model, model_type):
        if entry.key not in tensors:
            raise ValueError(f"tensor {entry.key!r} is missing from {source} "
                             f"({len(tensors)} tensors there): the checkpoint does not match its "
                             f"config.json (model_type={model_type!r}); re-export it or fix the "
                             "config.")
        found = np.asarray(tensors[entry.key], np.float32)
        try:
            values = entry.to_tx(found)
        except ValueError as e:  # a reshape that cannot fit
            raise _shape_error(entry, found, source) from e
        used.add(entry.key)
        for param, value in zip(entry.params, values):
            if tuple(param[...].shape) != tuple(value.shape):
                raise _shape_error(entry, found, source)
            param.set_value(jnp.asarray(value, dtype=param[...].dtype))
    ignored = family.ignored(model.config, model_type)
    extra = sorted(k for k in tensors if k not in used and not k.endswith(ignored))
    if extra:
        raise ValueError(f"checkpoint tensors {extra[:5]}{'...' if len(extra) > 5 else ''} "
                         "have no place in the tx model: an unsupported option is in use.")


def load(path: str | os.PathLike, *, seed: int = 0, **overrides) -> nnx.Module:
    """A tx model with the weights of the HF checkpoint directory ``path``."""
    hf = _read_config(path)
    tensors = read_safetensors(path)
    model = models.build(_config(hf, tensors, **overrides), seed=seed)
    family = _family(hf.get("model_type"))
    if hasattr(family, "canonical_tensors"):  # a layout config.json names (rope_interleave)
        tensors = family.canonical_tensors(hf, tensors)
    load_weights(model, tensors, source=", ".join(map(repr, safetensors_files(path))),
                 model_type=hf.get("model_type"))
    return model


def state_dict(model, *, model_type: str | None = None) -> dict[str, np.ndarray]:
    """The model's parameters under HF names, in HF layouts (numpy, fp32)."""
    model_type = _resolve(model.config, model_type)
    out = {}
    for entry in _family(model_type).entries(model, model_type):
        out[entry.key] = np.ascontiguousarray(
            entry.to_hf(*(np.asarray(p[...], np.float32) for p in entry.params)))
    return out


def save(model, path: str | os.PathLike, *, extra_config: dict | None = None,
         model_type: str | None = None) -> None:
    """Writes ``config.json`` and ``model.safetensors`` for ``transformers``' from_pretrained,
    as ``model_type`` (default: the family the config corresponds to)."""
    from safetensors.numpy import save_file
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model_type = _resolve(model.config, model_type)
    hf = hf_config_from(model.config, model_type=model_type)
    hf.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file(state_dict(model, model_type=model_type), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


__all__: Sequence[str] = ("FAMILIES", "MODEL_TYPES", "config_from_hf", "hf_config_from",
                          "load", "load_weights", "model_type_of", "read_safetensors",
                          "safetensors_files", "save", "state_dict")
