"""Cut one training window out of a waveform, exactly as `rfield.WindowPlan` lays it out."""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..features import mfcc_features
from ..rfield import WindowPlan


def valid_starts(n_samples: int, p: WindowPlan) -> range:
    """First-target times t0 whose joint window lies inside a signal of n_samples."""
    return range(p.before, n_samples - p.after + 1)


def cut_window(wav: np.ndarray, t0: int, p: WindowPlan, m: ModelConfig):
    """-> (features (n_in, n_frames) float32, decoder wav (N + R,) float32) for targets
    wav[t0 : t0 + N]. Raises if the window leaves the signal."""
    if t0 - p.before < 0 or t0 + p.after > len(wav):
        raise ValueError(f"window at t0={t0} leaves the signal of {len(wav)} samples "
                         f"(needs {p.before} before and {p.after} after)")
    e0 = t0 - p.enc_offset
    feats = mfcc_features(wav[e0: e0 + p.enc_len], m)
    dec = np.asarray(wav[t0 - p.dec_context: t0 + p.n_win], dtype=np.float32)
    return feats, dec
