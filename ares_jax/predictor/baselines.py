"""Model-free baselines and TRAIL's Bayesian refinement (host-side numpy).

* ``MedianBaseline``: the training median of the remaining length.
* ``SurvivalTable``: the training median of the remaining length *given t* (bucketed). In the
  pilot this beat every learned head trained on ~200 requests; the hidden state has to beat it.
* ``trail_refine``: TRAIL's refresh-to-refresh Bayesian update with a bin-transition prior.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def clip_remaining(pred: np.ndarray, t: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
    """Host twin of ``heads.clip_remaining``: every method is clipped to [0, max_tokens - t]."""
    return np.clip(pred, 0.0, np.maximum(max_tokens - t, 0)).astype(np.float32)


@dataclasses.dataclass
class MedianBaseline:
    value: float

    @classmethod
    def fit(cls, remaining: np.ndarray) -> MedianBaseline:
        return cls(float(np.median(remaining)))

    def predict(self, t: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        return clip_remaining(np.full(t.shape, self.value), t, max_tokens)

    @property
    def num_entries(self) -> int:
        return 1


@dataclasses.dataclass
class SurvivalTable:
    bucket: int
    medians: np.ndarray  # [num_buckets] median remaining for t in [b*bucket, (b+1)*bucket)

    @classmethod
    def fit(cls, t: np.ndarray, remaining: np.ndarray, bucket: int = 16,
            min_count: int = 30) -> SurvivalTable:
        b = t // bucket
        medians = np.zeros(int(b.max()) + 1, np.float32)
        for i in range(medians.size):
            sel = remaining[b == i]
            if sel.size < min_count:  # a thin tail: pool everything at or beyond this t
                sel = remaining[b >= i]
            medians[i] = np.median(sel) if sel.size else medians[max(i - 1, 0)]
        return cls(bucket, medians)

    def predict(self, t: np.ndarray, max_tokens: np.ndarray) -> np.ndarray:
        b = np.minimum(t // self.bucket, self.medians.size - 1)
        return clip_remaining(self.medians[b], t, max_tokens)

    @property
    def num_entries(self) -> int:
        return int(self.medians.size)


def transition_matrix(bins: np.ndarray, sample_request: np.ndarray, t: np.ndarray,
                      num_bins: int) -> np.ndarray:
    """P(bin at the next refresh | bin now), counted over consecutive points of the same
    training request, with add-one smoothing."""
    order = np.lexsort((t, sample_request))
    b, r = bins[order], sample_request[order]
    same = r[1:] == r[:-1]
    counts = np.ones((num_bins, num_bins))
    np.add.at(counts, (b[:-1][same], b[1:][same]), 1.0)
    return counts / counts.sum(1, keepdims=True)


def trail_refine(probs: np.ndarray, sample_request: np.ndarray, t: np.ndarray,
                 transition: np.ndarray) -> np.ndarray:
    """Posterior bin probabilities per point: at a request's first point the classifier's
    output; afterwards prior = previous posterior @ transition, posterior ∝ prior * output."""
    post = np.empty_like(probs)
    order = np.lexsort((t, sample_request))
    prev_request, prev = -1, None
    for i in order:
        p = probs[i]
        if sample_request[i] == prev_request and prev is not None:
            p = (prev @ transition) * p
            p = p / max(p.sum(), 1e-30)
        post[i] = p
        prev_request, prev = sample_request[i], p
    return post
