"""Cut training windows out of a waveform, exactly as `rfield.WindowPlan` lays them out: the one
definition the slice buffer (training, validation) and the tests use."""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..features import mfcc_features
from ..rfield import WindowPlan


def valid_starts(n_samples: int, p: WindowPlan) -> range:
    """First-target times t0 whose joint window lies inside a signal of n_samples."""
    return range(p.before, n_samples - p.after + 1)


def window_slices(t0: int, p: WindowPlan) -> tuple[slice, slice]:
    """(encoder window, decoder window) of the window whose first target is wav[t0]: the encoder reads
    wav[t0 - enc_offset : + enc_len], the decoder wav[t0 - R : t0 + N] (its targets are the last N)."""
    e0 = t0 - p.enc_offset
    return slice(e0, e0 + p.enc_len), slice(t0 - p.dec_context, t0 + p.n_win)


def cut_window(wav: np.ndarray, t0: int, p: WindowPlan, m: ModelConfig):
    """-> (features (n_in, n_frames) float32, decoder wav (N + R,) float32) for targets
    wav[t0 : t0 + N]. Raises if the window leaves the signal."""
    if t0 - p.before < 0 or t0 + p.after > len(wav):
        raise ValueError(f"window at t0={t0} leaves the signal of {len(wav)} samples "
                         f"(needs {p.before} before and {p.after} after)")
    enc, dec = window_slices(t0, p)
    return mfcc_features(wav[enc], m), np.asarray(wav[dec], dtype=np.float32)
