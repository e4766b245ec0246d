"""BERT masked-LM corruption (Devlin et al. 2019, section 3.1).

Each maskable token is selected with probability ``rate`` (15%); a selected token becomes MASK
80% of the time, a random ordinary token 10% and stays unchanged 10%. The loss is taken at the
selected positions only (``weights``), whatever happened to them.
"""

from __future__ import annotations

import numpy as np

from tx.data.vocab import MASK


def bert_corrupt(rng: np.random.Generator, tokens: np.ndarray, maskable: np.ndarray, *,
                 random_low: int, random_high: int, rate: float = 0.15,
                 mask_prob: float = 0.8, random_prob: float = 0.1) -> dict[str, np.ndarray]:
    """``tokens``/``maskable`` ``[B, T]`` -> ``inputs`` (corrupted), ``targets``, ``weights``.

    Random replacements are drawn from ``[random_low, random_high)``. A row with maskable tokens
    but no selection gets one selected position, so no row contributes zero weight (this raises
    the rate slightly only for very short rows).
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate={rate} must be in (0, 1]")
    if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
        raise ValueError(f"{mask_prob=} and {random_prob=} must be >= 0 and sum to at most 1")
    tokens = np.asarray(tokens, np.int32)
    maskable = np.asarray(maskable, bool)
    # Draw every array unconditionally, in a fixed order, so results depend on the rng state only.
    selected = (rng.random(tokens.shape) < rate) & maskable
    fallback_score = np.where(maskable, rng.random(tokens.shape), -1.0)
    action = rng.random(tokens.shape)
    random_ids = rng.integers(random_low, random_high, tokens.shape, dtype=np.int32)

    empty = ~selected.any(axis=1) & maskable.any(axis=1)
    rows = np.nonzero(empty)[0]
    selected[rows, fallback_score[rows].argmax(axis=1)] = True

    to_mask = selected & (action < mask_prob)
    to_random = selected & (action >= mask_prob) & (action < mask_prob + random_prob)
    inputs = np.where(to_mask, MASK, np.where(to_random, random_ids, tokens)).astype(np.int32)
    return {"inputs": inputs, "targets": tokens, "weights": selected.astype(np.float32)}
