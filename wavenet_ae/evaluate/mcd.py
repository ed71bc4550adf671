"""Mel-cepstral distortion between an input and its resynthesis."""
from __future__ import annotations

import math

import numpy as np


def mel_cepstral_distortion(ref: np.ndarray, gen: np.ndarray, sr: int, n_mcep: int = 24) -> float:
    """MCD in dB over DTW-aligned frames, cepstra 1..n_mcep (c0, the energy, excluded).
    librosa's cepstra are of 10 log10(power) = (20 / ln 10) ln(amplitude); MCD is defined on
    cepstra of ln(amplitude), hence the rescaling."""
    import librosa
    kw = dict(sr=sr, n_mfcc=n_mcep + 1, n_fft=1024, hop_length=256, n_mels=40)
    a = librosa.feature.mfcc(y=ref, **kw)[1:]
    b = librosa.feature.mfcc(y=gen, **kw)[1:]
    _, path = librosa.sequence.dtw(X=a, Y=b, metric="euclidean")
    d = (a[:, path[:, 0]] - b[:, path[:, 1]]) * (math.log(10) / 20.0)
    return float((10.0 / math.log(10)) * np.mean(np.sqrt(2.0 * (d ** 2).sum(0))))
