"""Helpers shared by the Hugging Face parity tests: tiny random ``transformers`` models, saved
once, and padded batches. No downloads."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TOL = 1e-4  # fp32 max abs logit difference


def hf_model(transformers, torch, cls_name: str, config_name: str, *, seed: int = 0,
             spread: float = 0.0, **config):
    """A random ``cls_name`` model in eval mode. ``spread > 0`` redraws every weight as
    ``N(0, spread)`` (norm scales ``1 + N(0, 0.1)``): HF's small default init makes tiny
    models predict one token everywhere, which would make greedy parity vacuous."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, config_name)(**config)).eval()
    if spread:
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn_like(p)
                p.copy_(1 + 0.1 * noise if "norm" in name.lower() else spread * noise)
    return model


def save(tmp_path_factory, name: str, model) -> str:
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return str(path)


def padded_batch(vocab: int, seed: int = 0, t: int = 12, lengths=(12, 7, 3)):
    """Right-padded ids ``[B, T]`` (pad 0), validity ``[B, T]`` and lengths ``[B]``."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (len(lengths), t))
    valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    return np.where(valid, ids, 0), valid, np.asarray(lengths, np.int32)


def hf_logits(torch, ref, ids, valid):
    """``transformers``' logits of ``ids [B, T]`` with ``valid [B, T]`` as attention mask."""
    with torch.no_grad():
        return ref(torch.tensor(ids), attention_mask=torch.tensor(
            valid.astype(np.int64))).logits.numpy()


def padded_logit_diff(torch, model, ref, vocab: int, seed: int = 0) -> float:
    """Max |tx - HF| logit over the valid positions of a right-padded batch (rows 12, 8, 3)."""
    ids, valid, lengths = padded_batch(vocab, seed, t=12, lengths=(12, 8, 3))
    got = np.asarray(model(jnp.asarray(ids), lengths_b=jnp.asarray(lengths)))
    return float(np.abs(got - hf_logits(torch, ref, ids, valid))[valid].max())


def hf_greedy(torch, ref, prompt, *, new: int, eos: int, pad: int):
    """``transformers``' greedy continuation of ``prompt [B, T]`` as ``[B, new]``: HF stops
    once every row is done, tx pads with ``pad``, so the tail is padded to match."""
    with torch.no_grad():
        ids = torch.tensor(prompt)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new, eos_token_id=eos,
                           pad_token_id=pad).numpy()[:, prompt.shape[1]:]
    want = np.full((len(prompt), new), pad, np.int64)
    want[:, :out.shape[1]] = out
    return want
