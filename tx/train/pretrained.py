"""Starting a run from pretrained weights: ``config.init``.

``init.hf`` (a Hugging Face checkpoint directory) or ``init.workdir`` (a tx run) names the
weights a fresh run starts from. The model section of the config then comes from that
checkpoint: a ``config.model`` field left at its default takes the checkpoint's value, a field
set to something else overrides it when it does not change a weight's shape, and fails naming
the field when it does. Swaps, applied after loading and before training:

* ``init.swap.num_kv_heads``: fewer K/V heads, by mean-pooling each group's projections (the
  GQA paper's uptraining start) or, with ``init.swap.kv_init='random'``, freshly initialised;
* ``init.swap.layer_pattern`` / ``init.swap.window``: a per-layer attention pattern (e.g.
  ``local,local,local,full``) and the local window; the weights are untouched.

:func:`with_source_model` runs once per ``train.run``: on a fresh workdir it reads the source's
config, on a workdir with checkpoints it takes the saved run's model section instead, so a
resumed run never reads (or reloads) the initial weights. The merged model section is what the
run saves, so evaluation, generation and export reopen it from the workdir alone.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from tx.attention import patterns
from tx.flags import ModelFlags
from tx.train import configs as configs_lib
from tx.train import workdir as workdir_lib
from tx.train.configs import INIT, ConfigError

KV_INITS = ("mean", "random")
# Model fields a loaded weight's shape (or meaning: norm_unit_offset) depends on: overriding
# one cannot reuse the weights.
SHAPE_FIELDS = ("task", "vocab_size", "d_model", "num_layers", "num_decoder_layers",
                "num_heads", "num_kv_heads", "head_dim", "d_ff", "activation", "norm",
                "positions", "max_len", "tie_embeddings", "t5_buckets", "attention_bias",
                "attention_out_bias", "mlp_bias", "type_vocab_size", "embed_norm",
                "head_transform", "head_bias", "pooler", "num_classes", "sandwich_norm",
                "norm_unit_offset", "attention_sinks", "attention_qk_norm")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.init`` (all unset when the config has none)."""
    return config.init if "init" in config else ml_collections.ConfigDict(INIT)


def requested(config: ml_collections.ConfigDict) -> bool:
    init = section(config)
    return bool(init.hf or init.workdir)


def check(config: ml_collections.ConfigDict, *, fresh: bool = True) -> None:
    """Before anything loads: one source, known swap values, and (``fresh``: the run will read
    it) a source that exists."""
    init = section(config)
    unknown = sorted(set(init) - set(INIT)) + sorted(set(init.swap) - set(INIT["swap"]))
    if unknown:
        raise ConfigError(f"config.init fields {unknown} do not exist; known: "
                          f"{sorted(INIT)} and swap.{sorted(INIT['swap'])}")
    if init.hf and init.workdir:
        raise ConfigError(f"config.init.hf={init.hf!r} and config.init.workdir="
                          f"{init.workdir!r}: give one source of initial weights.")
    if fresh and init.hf and not (pathlib.Path(init.hf) / "config.json").is_file():
        raise ConfigError(f"config.init.hf={init.hf!r}: no config.json there; give a Hugging "
                          "Face checkpoint directory (save_pretrained's output).")
    if fresh and init.workdir and not (pathlib.Path(init.workdir) / "config.json").is_file():
        raise ConfigError(f"config.init.workdir={init.workdir!r}: no config.json there; give "
                          "the --workdir of a finished tx run.")
    swap = init.swap
    if swap.kv_init not in KV_INITS:
        raise ConfigError(f"config.init.swap.kv_init={swap.kv_init!r}: use one of {KV_INITS}.")
    for name in ("num_kv_heads", "window"):
        if isinstance(swap[name], bool) or not isinstance(swap[name], int) or swap[name] < 0:
            raise ConfigError(f"config.init.swap.{name}={swap[name]!r}: must be an integer "
                              ">= 0 (0: no swap).")
    if (swap.num_kv_heads or swap.layer_pattern or swap.window) and not requested(config):
        raise ConfigError("config.init.swap.* swaps the attention of loaded weights: set "
                          "config.init.hf or config.init.workdir too.")


def _source_fields(init) -> dict[str, Any]:
    """The source checkpoint's model flags: those that differ from their defaults, and every
    field that shapes the weights (``_merge`` names the checkpoint's value of each)."""
    if init.hf:
        from tx import flags
        from tx.interop import hf
        try:
            fields = flags.to_flags(hf.config_from_hf(init.hf))
        except ValueError as e:
            raise ConfigError(f"config.init.hf={init.hf!r}: {e}") from None
        if fields.get("rope_scaling") is not None:
            raise ConfigError(f"config.init.hf={init.hf!r}: RoPE-scaled checkpoints cannot start "
                              "a training run yet (their scaling is not a config flag).")
        every = ModelFlags(**fields)
        fields.update((k, v) for k, v in every.to_dict().items() if k in SHAPE_FIELDS)
        fields["num_kv_heads"] = every.kv_heads  # explicit, as the checkpoint fixes it
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    saved = json.loads((pathlib.Path(init.workdir) / "config.json").read_text())
    return dict(saved["model"])


def _merge(base: dict[str, Any], current: dict[str, Any], where: str) -> dict[str, Any]:
    """``base`` (the checkpoint's flags) updated by ``current``'s non-default fields; a
    shape field that differs fails."""
    defaults = ModelFlags().to_dict()
    merged = dict(base)
    for name, value in current.items():
        default = defaults.get(name)
        value_n = tuple(value) if isinstance(value, list) else value
        if value is None or value_n == default:
            continue
        if name in SHAPE_FIELDS and merged.get(name) != value:
            raise ConfigError(
                f"config.model.{name}={value!r}: the weights of {where} fix it at "
                f"{merged.get(name)!r}. Drop the flag (configs/pretrained.py leaves the model "
                "to the checkpoint), or use config.init.swap.num_kv_heads for fewer K/V heads.")
        merged[name] = value
    return merged


def with_source_model(config: ml_collections.ConfigDict, saved_model: dict | None
                      ) -> ml_collections.ConfigDict:
    """``config`` with its model section merged onto the source checkpoint's (or, when
    ``saved_model`` is given, the resumed run's) and the swaps applied as flags."""
    check(config, fresh=saved_model is None)
    if not requested(config):
        return config
    init = section(config)
    where = f"config.init.{'hf' if init.hf else 'workdir'}={init.hf or init.workdir!r}"
    current = config.model.to_dict()
    if saved_model is not None:  # resuming: the run's own model; the source is not read
        merged = _merge(saved_model, current, "the run in this workdir")
    else:
        merged = _merge(_source_fields(init), current, where)
        kv = merged.get("num_kv_heads") or merged.get("num_heads")
        if init.swap.num_kv_heads and kv % init.swap.num_kv_heads:
            raise ConfigError(f"config.init.swap.num_kv_heads={init.swap.num_kv_heads}: must "
                              f"divide the checkpoint's {kv} K/V heads (mean-pooling merges "
                              "whole groups).")
    # The swaps as model flags, on a fresh start and on every resume alike (the weights are
    # swapped once, on the fresh start).
    swap = init.swap
    preset, pattern = patterns.split_attention(merged.get("attention", ""))
    if swap.num_kv_heads:  # the swap replaces the heads, a preset included
        merged["num_kv_heads"], preset = swap.num_kv_heads, None
    if swap.layer_pattern:  # ... and the pattern of every layer
        merged["layer_pattern"], pattern = [p for p in swap.layer_pattern.split(",") if p], None
    merged["attention"] = "+".join(p for p in (preset, pattern) if p)
    if swap.window:
        merged["window"] = swap.window
    out = copy.deepcopy(config)
    with out.unlocked():
        out.model = ml_collections.ConfigDict(merged)
    if saved_model is None:
        _use_source_tokenizer(out, init)
    return out


def _use_source_tokenizer(config: ml_collections.ConfigDict, init) -> None:
    """A source with its own ``tokenizer.json`` trains on text tokenised with it: the dataset's
    ``tokenizer`` option defaults to that file; a dataset that cannot tokenise fails (its byte
    ids would silently mean other tokens to a BPE model)."""
    path = pathlib.Path(init.hf or init.workdir) / "tokenizer.json"
    if not path.is_file():
        return
    from tx import data as data_lib
    build = data_lib.REGISTRY.get(config.data.name)
    if build is None or "tokenizer" not in getattr(build, "options", ()):
        raise ConfigError(f"config.data.name={config.data.name!r}: the checkpoint of "
                          f"config.init has its own tokenizer ({path}), and this dataset yields "
                          "byte ids; train on text it tokenises, e.g. configs/pretrained.py:text "
                          "(dataset text_files) with --config.data.options.paths=...")
    options = config.data.options
    if options.get("tokenizer") in (None, ""):
        with options.unlocked():
            options.tokenizer = str(path)


# ----------------------------------------------------------------------------- the weights


def _source_model(init, seed: int) -> tuple[nnx.Module, dict]:
    """The checkpoint's model, exactly as saved (before any swap), and its model flags."""
    if init.hf:
        from tx.interop import hf
        return hf.load(init.hf, seed=seed), _source_fields(init)
    resolved = configs_lib.resolve(workdir_lib.saved_config(init.workdir))
    model, step = workdir_lib.load_model(resolved, init.workdir)  # parameters only
    if step is None:
        raise ConfigError(f"config.init.workdir={init.workdir!r} holds no complete checkpoint.")
    return model, _source_fields(init)


def initial_params(config: ml_collections.ConfigDict, template, *, seed: int,
                   wrap=lambda model: None):
    """The source's parameters after the swaps, in the structure, shapes and shardings of
    ``template`` (the fresh run's params). ``wrap`` applies what the run does to its own model
    (e.g. rematerialisation wrappers) so the two trees line up."""
    from tx.interop import swap
    init = section(config)
    model, fields = _source_model(init, seed)
    target_kv = init.swap.num_kv_heads
    if target_kv and target_kv != model.config.kv_heads:
        if model.config.kv_heads % target_kv:
            raise ConfigError(f"config.init.swap.num_kv_heads={target_kv}: must divide the "
                              f"checkpoint's {model.config.kv_heads} K/V heads.")
        model = swap.pool_kv_heads(model, target_kv)  # 'random' then takes the fresh K/V below
    wrap(model)
    source = nnx.state(model, nnx.Param)
    flat_src = dict(nnx.to_flat_state(source))
    flat_tpl = dict(nnx.to_flat_state(template))
    missing = sorted(set(flat_tpl) ^ set(flat_src))
    if missing:
        raise ConfigError(f"config.init: the run's model and the checkpoint's differ in "
                          f"parameter {'/'.join(map(str, missing[0]))}; the config fields that "
                          "shape the model must match the checkpoint's.")
    for path, leaf in flat_tpl.items():
        if path[-1] in ("k_dkh", "v_dkh", "k_bias_kh", "v_bias_kh") and init.swap.kv_init == \
                "random" and target_kv:
            continue  # keep the fresh initialisation of the swapped K/V projections
        src = flat_src[path]
        if np.shape(src[...]) != np.shape(leaf[...]):
            raise ConfigError(f"config.init: parameter {'/'.join(map(str, path))} has shape "
                              f"{np.shape(src[...])} in the checkpoint and "
                              f"{np.shape(leaf[...])} in the run's model.")
        value = src[...].astype(leaf[...].dtype)
        sharding = getattr(leaf[...], "sharding", None)
        leaf.set_value(jax.device_put(value, sharding) if sharding is not None else value)
    return template


def describe(config: ml_collections.ConfigDict) -> str:
    """``init.hf=PATH`` plus the swaps, for the run's first line."""
    init = section(config)
    out = f"init.hf={init.hf}" if init.hf else f"init.workdir={init.workdir}"
    swaps = [f"{k}={v}" for k, v in init.swap.items()
             if v and not (k == "kv_init" and not init.swap.num_kv_heads)]
    return out + (f" with swaps {', '.join(swaps)}" if swaps else "")


def copy_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """The source's tokenizer files, into the run's workdir (generation, evaluation and export
    find them there)."""
    init = section(config)
    source = pathlib.Path(init.hf or init.workdir)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (workdir / name).exists():
            shutil.copyfile(source / name, workdir / name)
