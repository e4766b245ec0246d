"""Flash attention's memory layouts: query heads folded into tile rows, zero padding to tile
multiples, segment ids per folded row. ``cfg`` is ``kernels.flash_kernels.Config``."""

import jax.numpy as jnp


def fold_rows(cfg, x_btnh, pad=None):
    """``[B,T,N,H]`` -> ``[B, N/fold, T_pad*fold, H_pad]``: fold heads into tile rows.
    ``pad``: the padded width (default q/k's; the output and its cotangent take v's)."""
    b, t, n, h = x_btnh.shape
    pad = cfg.head_dim_pad if pad is None else pad
    x = jnp.pad(x_btnh, ((0, 0), (0, cfg.q_pad - t), (0, 0), (0, pad - h)))
    x = x.reshape(b, cfg.q_pad, n // cfg.fold, cfg.fold, pad)
    return x.transpose(0, 2, 1, 3, 4).reshape(b, n // cfg.fold, cfg.q_pad * cfg.fold, pad)


def unfold_rows(cfg, x_f, dtype, dim=None):
    """Inverse of ``fold_rows`` (drops the padding; ``dim``: the width kept, default H)."""
    b, hg, _, hp = x_f.shape
    x = x_f.reshape(b, hg, cfg.q_pad, cfg.fold, hp).transpose(0, 2, 1, 3, 4)
    x = x.reshape(b, cfg.q_pad, hg * cfg.fold, hp)
    return x[:, :cfg.q_len, :, :cfg.head_dim if dim is None else dim].astype(dtype)


def pad_kv(cfg, x_bskh, pad=None):
    s, h = x_bskh.shape[1], x_bskh.shape[3]
    pad = cfg.head_dim_pad if pad is None else pad
    return jnp.pad(x_bskh, ((0, 0), (0, cfg.kv_pad - s), (0, 0), (0, pad - h)))


def segments(cfg, segment_ids):
    if segment_ids is None:
        return None, None
    q_seg, kv_seg = (x.astype(jnp.int32) for x in segment_ids)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, cfg.q_pad - cfg.q_len)))
    q_seg = jnp.repeat(q_seg, cfg.fold, axis=1)  # one id per folded row
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, cfg.kv_pad - cfg.kv_len)))
    return q_seg, kv_seg
