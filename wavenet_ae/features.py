"""MFCC + delta + delta-delta features, framed exactly as `rfield.featurizer_layers` says.

The definition is librosa's (`mfcc_features_ref`, the reference beside the fast path): power
spectrogram of periodic-Hamming frames, Slaney mel filterbank, dB, orthonormal DCT-II, Savitzky-Golay
deltas. librosa pads by default (`center=True`) and fills delta edges by interpolation; both would make
a frame depend on audio outside its window. We frame with `center=False` and drop the
`(delta_width - 1) / 2` edge frames on each side whose deltas were interpolated, so frame i reads
exactly wav[i * hop, i * hop + mfcc_win + (delta_width - 1) * hop).

The log-mel power is floored at an absolute level (`ModelConfig.mfcc_floor_db`), not at librosa's
default of 80 dB below the maximum of the whole array, so a frame does not depend on the other
windows of a batch or on the rest of the file: a window's features are the same alone, in any batch
and cut from the whole utterance. Runs made before this (config without the key) keep the old,
array-relative definition they were trained with, computed by librosa.

`mfcc_features` computes the absolute-floor definition with torch on the input's device (numpy in:
on the CPU) in float64, log-mel values on a 2^-17 dB grid, rounded to float32 once at the end;
librosa is not imported (it costs seconds), except for legacy configs. Log-mel values more than
512 dB above the floor are clipped there (a power of 10^41 re 1.0 at the default floor).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig
from .ops._ext import no_autocast

# Bytes of a pass's windowed frames (float64, n_fft per row) in the spectral stage; its other
# temporaries are about as large. Frames are computed independently (see the fast path), so the split
# does not matter. On the CPU, temporaries of a few MB came back from glibc malloc as fresh pages on
# every call: the paper preset's batch (528 frames of 400) took ~1000 page faults and 4.2 ms a call in
# one pass, 1.6-1.7 ms in passes of 128 frames (~400 KB; in five fresh processes each, passes of 163 to
# 512 frames were 2.5-4.3 ms in some). Elsewhere (CUDA's caching allocator) passes only bound the
# memory a long file takes.
CHUNK_BYTES = {"cpu": 400_000}
CHUNK_BYTES_DEFAULT = 1 << 26


def n_feature_frames(n_samples: int, m: ModelConfig) -> int:
    if n_samples < m.mfcc_win:
        return 0
    return max(0, 1 + (n_samples - m.mfcc_win) // m.mfcc_hop - (m.delta_width - 1))


def _check_length(n_samples: int, m: ModelConfig) -> int:
    n = n_feature_frames(n_samples, m)
    if n <= 0:
        raise ValueError(f"{n_samples} samples are too few for one feature frame "
                         f"(need {m.mfcc_win + (m.delta_width - 1) * m.mfcc_hop})")
    return n


# --- constants: librosa's definitions, in float64 numpy ------------------------------------------------

def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa.hz_to_mel, htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = np.log(6.4) / 27.0
    log_part = min_log_hz / f_sp + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, f / f_sp)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) float64: librosa.filters.mel with its defaults (htk=False,
    norm='slaney'): triangles between adjacent mel-spaced edges, scaled to equal area."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_f = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_f)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]


def dct_matrix(n_mfcc: int, n_mels: int) -> np.ndarray:
    """(n_mfcc, n_mels) float64: the first rows of the orthonormal DCT-II (scipy's dct(norm='ortho'))."""
    k = np.arange(n_mfcc)[:, None]
    n = np.arange(n_mels)[None, :]
    d = np.sqrt(2.0 / n_mels) * np.cos(np.pi * k * (2 * n + 1) / (2 * n_mels))
    d[0] /= np.sqrt(2.0)
    return d


def savgol_deltas(width: int, order: int) -> np.ndarray:
    """(width,) float64 h with delta[t] = sum_j h[j] x[t - (width-1)/2 + j] away from the edges:
    what librosa.feature.delta (scipy.signal.savgol_filter(window_length=width, polyorder=order,
    deriv=order)) applies to interior frames (scipy.signal.savgol_coeffs(..., use='dot'))."""
    half = (width - 1) // 2
    x = np.arange(-half, half + 1, dtype=np.float64)
    a = x ** np.arange(order + 1)[:, None]            # (order + 1, width) Vandermonde
    y = np.zeros(order + 1)
    y[order] = math.factorial(order)
    return np.linalg.lstsq(a, y, rcond=None)[0]


def periodic_hamming(n: int) -> np.ndarray:
    """scipy.signal.get_window('hamming', n, fftbins=True), librosa's window='hamming': 0.54 - 0.46
    cos(2 pi i / n), written as scipy computes it (a cosine over [-pi, pi], n + 1 points, the last
    dropped) so that it is the same float64 numbers."""
    fac = np.linspace(-np.pi, np.pi, n + 1)[:n]
    return 0.54 + (1.0 - 0.54) * np.cos(fac)


# The log-mel grid (see "the fast path"): values are kept as integer multiples of 2^-17 dB above the floor
# (7.6e-6 dB, a float32's step between 64 and 128 dB), at most 2^26 steps (512 dB).
GRID_DB = 2.0 ** -17
GRID_STEPS = 2 ** 26


class _Consts(NamedTuple):
    window: torch.Tensor        # (n_fft,)
    mel_t: torch.Tensor         # (n_fft // 2 + 1, n_mels) filterbank, transposed
    dct_t: torch.Tensor         # (n_mels, n_mfcc - 1) DCT rows 1.., integers in units of 2^-dct_bits
    dct_scale: float            # GRID_DB * 2^-dct_bits: grid steps x DCT units -> coefficient
    c0_scale: float             # GRID_DB / sqrt(n_mels): sum of grid steps -> c0 above the floor's
    c0_floor: float             # sqrt(n_mels) * floor_db: c0 of a floored frame
    deltas: torch.Tensor        # (2, 1, 1, width): delta and delta-delta coefficients
    amin: float                 # the power floor 10^(floor_db / 10)
    floor_db: float


def dct_bits(n_mfcc: int, n_mels: int) -> int:
    """The finest grid 2^-b for rows 1.. of the DCT matrix with which every product sum of a row with a
    vector of grid-step differences (|.| < GRID_STEPS) is exact in float64 (integers <= 2^53)."""
    d = dct_matrix(n_mfcc, n_mels)[1:]
    b = 52
    while d.size and np.abs(np.round(d * 2.0 ** b)).sum(axis=1).max() * (GRID_STEPS - 1) > 2.0 ** 53:
        b -= 1
    return b


@functools.lru_cache(maxsize=None)
def _consts(sample_rate: int, n_fft: int, n_mels: int, n_mfcc: int, width: int, floor_db: float,
            device: torch.device) -> _Consts:
    b = dct_bits(n_mfcc, n_mels)
    deltas = np.stack([savgol_deltas(width, 1), savgol_deltas(width, 2)])[:, None, None, :]

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)
    return _Consts(t(periodic_hamming(n_fft)), t(mel_filterbank(sample_rate, n_fft, n_mels).T),
                   t(np.round(dct_matrix(n_mfcc, n_mels)[1:] * 2.0 ** b).T), GRID_DB * 2.0 ** -b,
                   GRID_DB / np.sqrt(n_mels), np.sqrt(n_mels) * floor_db, t(deltas),
                   10.0 ** (floor_db / 10), floor_db)


# --- the fast path ------------------------------------------------------------------------------------
#
# float64 throughout, rounded to float32 once; the two projections are float64 matmuls, which no
# TF32 / bf16 setting touches (and autocast is off). A window's features are tested bit for bit alone,
# in a batch and cut from the file (tests/test_features.py), but a BLAS row result depends on the
# matrix height (MKL here: 30 to 60 of 80 row slices of a (3000, 201) @ (201, 40) product differed from
# the full product's rows, float32 and float64), and rounding the float64 result to float32 does not
# hide that where the exact value is ~0: the DCT of a silent, floored frame gives c1.. = +-1e-14 that
# depend on the order. So:
#  - log-mel values are rounded to a fixed grid: an integer number y of GRID_DB steps above the floor.
#    A last-bit difference of the mel product (~1e-16 relative, i.e. ~4e-16 dB) changes y only if the
#    value lies that close to a midpoint between steps: ~1e-10 of the values.
#  - c0 = (sum of y) * GRID_DB / sqrt(n_mels) + sqrt(n_mels) * floor: the sum of integers is exact.
#  - c1.. (DCT rows summing to 0) are taken of y - round(mean y), the frame's spread about its own
#    level (the level would multiply the matrix's rounding error), with the matrix rounded to integers
#    in units of 2^-dct_bits (error <= 2^-(dct_bits+1), 1.5e-8 for 40 mels): a sum of integers below
#    2^53, exact, the same in any order, BLAS or device. A floored frame gives exactly (c0_floor, 0, ...).
#  - the deltas are elementwise sums of shifted slices (differences from the centre frame), in one order.
# The rfft is per row (checked: a row's is the same bits alone or among 3000 rows; a difference would
# also be absorbed by the grid). Errors (tests/test_features.py measures them against float64 librosa):
# the grid, <= GRID_DB / 2 per log-mel value, moves a coefficient by ~GRID_DB / sqrt(12) (rows have unit
# norm); the rounded matrix by ~1e-8 x the spread of the log-mel values about their mean.

def _static_mfcc(frames: torch.Tensor, c: _Consts) -> torch.Tensor:
    """frames (..., n_fft) float64 -> static MFCCs (..., n_mfcc) float64."""
    sq = torch.view_as_real(torch.fft.rfft(frames * c.window)).square()      # (..., n_fft // 2 + 1, 2)
    mel = (sq[..., 0] + sq[..., 1]) @ c.mel_t                                 # (..., n_mels) power
    del sq                                                                    # (see CHUNK_BYTES)
    db = torch.log10(mel.clamp_min(c.amin)) * 10.0                            # dB re 1.0, >= floor
    y = torch.round((db - c.floor_db) * (1.0 / GRID_DB)).clamp_(0.0, GRID_STEPS - 1)   # grid steps
    total = y.sum(-1, keepdim=True)                                           # exact: integers < 2^53
    level = torch.round(total * (1.0 / y.shape[-1]))
    rest = ((y - level) @ c.dct_t) * c.dct_scale + 0.0                        # c1.., exact sums; no -0
    return torch.cat([total * c.c0_scale + c.c0_floor, rest], -1)             # (..., n_mfcc)


def _features(x: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """x (B, T) float64 -> (B, 3 * n_mfcc, n) float64."""
    n = _check_length(x.shape[-1], m)
    c = _consts(m.sample_rate, m.mfcc_win, m.n_mels, m.n_mfcc, m.delta_width, float(m.mfcc_floor_db),
                x.device)
    frames = x.unfold(-1, m.mfcc_win, m.mfcc_hop)                             # (B, n + width - 1, n_fft) view
    rows = CHUNK_BYTES.get(x.device.type, CHUNK_BYTES_DEFAULT) // (8 * m.mfcc_win)
    step = max(1, rows // max(1, x.shape[0]))                                # frames per pass
    s = torch.cat([_static_mfcc(frames[:, i: i + step], c) for i in range(0, frames.shape[1], step)], 1)
    s = s.transpose(1, 2)                                                     # (B, n_mfcc, n + width - 1)
    # deltas of the interior frames: a weighted sum of shifted slices, in one fixed order, taken of the
    # differences from the centre frame (the filters sum to 0): a steady coefficient has deltas exactly 0,
    # and c0's level (~600) does not enter the rounding
    e = (m.delta_width - 1) // 2
    centre = s[..., e: e + n]
    d = torch.zeros_like(centre).unsqueeze(1)
    for j in range(m.delta_width):
        if j != e:
            d = d + (s[:, None, :, j: j + n] - centre[:, None]) * c.deltas[..., j]   # (B, 2, n_mfcc, n)
    return torch.cat([centre, d.flatten(1, 2) + 0.0], 1)                     # + 0.0: no -0


def mfcc_features(wav, m: ModelConfig):
    """wav (T,) or (B, T) -> features (n_in, F) or (B, n_in, F), float32.

    Rows: n_mfcc static coefficients, then their deltas, then delta-deltas. A numpy array gives a numpy
    array (computed with torch on the CPU); a tensor gives a tensor on its device. The signal is taken
    as float32 (a bfloat16 / float16 tensor is widened exactly, a float64 one rounded), the features
    are computed in float64 with autocast off and rounded once.
    """
    if m.mfcc_floor_db is None:                     # legacy runs: librosa's array-relative floor
        if isinstance(wav, torch.Tensor):
            return torch.from_numpy(mfcc_features_ref(wav.detach().float().cpu().numpy(), m)).to(wav.device)
        return mfcc_features_ref(wav, m)
    as_numpy = not isinstance(wav, torch.Tensor)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)) if as_numpy else wav.detach()
    if x.dim() not in (1, 2):
        raise ValueError(f"wav must be (T,) or (B, T), got shape {tuple(x.shape)}")
    with torch.no_grad(), no_autocast(x):
        x64 = x.to(torch.float32).to(torch.float64)
        feats = _features(x64.reshape(-1, x.shape[-1]), m).to(torch.float32)
    feats = feats[0] if x.dim() == 1 else feats
    return feats.numpy() if as_numpy else feats


# --- the reference ------------------------------------------------------------------------------------

def mfcc_features_ref(wav: np.ndarray, m: ModelConfig) -> np.ndarray:
    """The definition, with librosa: wav (T,) or (B, T) float -> (n_in, F) or (B, n_in, F) float32.
    Legacy configs (`mfcc_floor_db` None) use it as their features: their floor is 80 dB below the
    maximum of the whole array."""
    import librosa  # deferred: importing librosa costs seconds

    wav = np.asarray(wav, dtype=np.float32)
    n = _check_length(wav.shape[-1], m)
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
