"""MFCC + delta + delta-delta features (librosa), framed exactly as `rfield.featurizer_layers` says.

librosa pads by default (`center=True`) and fills delta edges by interpolation; both would make a
frame depend on audio outside its window. We frame with `center=False` and drop the
`(delta_width - 1) / 2` edge frames on each side whose deltas were interpolated, so frame i reads
exactly wav[i * hop, i * hop + mfcc_win + (delta_width - 1) * hop).

The log-mel power is floored at an absolute level (`ModelConfig.mfcc_floor_db`), not at librosa's
default of 80 dB below the maximum of the whole array, so a frame does not depend on the other
windows of a batch or on the rest of the file: a window's features are the same alone, in any batch
and cut from the whole utterance. Runs made before this (config without the key) keep the old,
array-relative definition they were trained with.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig


def n_feature_frames(n_samples: int, m: ModelConfig) -> int:
    if n_samples < m.mfcc_win:
        return 0
    return max(0, 1 + (n_samples - m.mfcc_win) // m.mfcc_hop - (m.delta_width - 1))


def mfcc_features(wav: np.ndarray, m: ModelConfig) -> np.ndarray:
    """wav (T,) or (B, T) float -> features (n_in, F) or (B, n_in, F), float32.

    Rows: n_mfcc static coefficients, then their deltas, then delta-deltas.
    """
    import librosa  # deferred: importing librosa costs ~1 s

    wav = np.asarray(wav, dtype=np.float32)
    n = n_feature_frames(wav.shape[-1], m)
    if n <= 0:
        raise ValueError(f"{wav.shape[-1]} samples are too few for one feature frame "
                         f"(need {m.mfcc_win + (m.delta_width - 1) * m.mfcc_hop})")
    mel = librosa.feature.melspectrogram(
        y=wav, sr=m.sample_rate, n_fft=m.mfcc_win, hop_length=m.mfcc_hop, win_length=m.mfcc_win,
        window="hamming", center=False, power=2.0, n_mels=m.n_mels, fmin=0.0, fmax=m.sample_rate / 2)
    if m.mfcc_floor_db is None:     # legacy runs: floor at (max of this array - 80 dB)
        log_mel = librosa.power_to_db(mel)
    else:
        log_mel = librosa.power_to_db(mel, ref=1.0, amin=10.0 ** (m.mfcc_floor_db / 10), top_db=None)
    mfcc = librosa.feature.mfcc(S=log_mel, n_mfcc=m.n_mfcc)
    d1 = librosa.feature.delta(mfcc, width=m.delta_width, order=1, axis=-1)
    d2 = librosa.feature.delta(mfcc, width=m.delta_width, order=2, axis=-1)
    e = (m.delta_width - 1) // 2
    feats = np.concatenate([mfcc, d1, d2], axis=-2)[..., e: e + n]
    return np.ascontiguousarray(feats, dtype=np.float32)
