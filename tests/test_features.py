"""Features are local: a frame is a function of the samples in its receptive field only, so a window's
features are bit-identical alone, in any batch, and cut from the whole file; runs made before that
keep the array-relative floor they were trained with."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wavenet_ae import features
from wavenet_ae.config import Config, preset
from wavenet_ae.data.slice_buffer import make_batch
from wavenet_ae.data.windows import cut_window
from wavenet_ae.features import mel_filterbank, mfcc_features, mfcc_features_ref
from wavenet_ae.model import WaveNetAE
from wavenet_ae.rfield import plan

SR = 16000


def _speech_like(seconds=2.0, seed=0):
    """Digital silence, a quiet hum, and loud bursts: the loud parts put the old array-relative floor
    (max - 80 dB) far above the silence, so silence's features depended on what shared its array."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    wav = 1e-4 * np.sin(2 * np.pi * 50 * t)
    wav[: n // 5] = 0.0
    for a, b in ((0.225, 0.4), (0.65, 0.85)):       # as fractions of the signal
        i, j = int(a * n), int(b * n)
        wav[i:j] += 0.8 * np.sin(2 * np.pi * 180 * t[i:j]) * (1 + 0.5 * rng.standard_normal(j - i))
    return np.clip(wav, -1, 1).astype(np.float32)


def test_window_features_are_the_same_alone_in_a_batch_and_cut_from_the_file():
    cfg = preset("tiny")
    m = cfg.model
    p = plan(m, cfg.data.n_win)
    wav = _speech_like()
    loud = (0.9 * np.sin(np.arange(len(wav)) * 0.3)).astype(np.float32)
    # windows on the file's frame grid (t0 - enc_offset a multiple of the MFCC hop): in silence, in the
    # hum, across the onset of a burst, inside the burst
    starts = [p.enc_offset + k * m.mfcc_hop for k in (0, 30, 65, 80)]
    starts = [t0 for t0 in starts if t0 + p.after <= len(wav)]
    alone = [cut_window(wav, t0, p, m)[0] for t0 in starts]
    whole = mfcc_features(wav, m)
    for t0, f in zip(starts, alone):
        k = (t0 - p.enc_offset) // m.mfcc_hop
        assert f.tobytes() == whole[:, k: k + p.n_frames].tobytes(), f"window at {t0} differs from the file's"
    # in a batch, next to other windows of this file and of a loud file, in either order
    chunks = [(0, wav, 0), (1, loud, 1)]
    picks = [(0, t0) for t0 in starts] + [(1, starts[1])]
    for order in (picks, picks[::-1]):
        feats = make_batch(chunks, order, p, m, {}).feats.numpy()
        for (c, t0), f in zip(order, feats):
            if c == 0:
                assert f.tobytes() == alone[starts.index(t0)].tobytes(), f"window at {t0} changed in a batch"
    # the floor is absolute: digital silence sits exactly at it (c0 = floor * sqrt(n_mels), the rest 0)
    silent = alone[0][:, 0]
    assert silent[0] == pytest.approx(m.mfcc_floor_db * np.sqrt(m.n_mels), rel=1e-5)
    assert np.abs(silent[1:]).max() < 1e-3


def test_encode_path_sees_the_training_window_features():
    """The whole-file path of encode/generate zero-pads the signal; the frames a training window reads
    are the same numbers there."""
    cfg = preset("tiny")
    m = cfg.model
    p = plan(m, cfg.data.n_win)
    wav = _speech_like(seed=1)
    left = 7 * m.mfcc_hop
    padded = np.concatenate([np.zeros(left, np.float32), wav, np.zeros(3000, np.float32)])
    whole = mfcc_features(padded, m)
    for t0 in (p.enc_offset + 40 * m.mfcc_hop, p.enc_offset + 71 * m.mfcc_hop):
        k = (left + t0 - p.enc_offset) // m.mfcc_hop
        assert cut_window(wav, t0, p, m)[0].tobytes() == whole[:, k: k + p.n_frames].tobytes()


def test_features_match_the_librosa_definition():
    import librosa
    m = preset("tiny").model
    wav = _speech_like(seconds=0.6, seed=2)
    mel = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=m.mfcc_win, hop_length=m.mfcc_hop,
                                         window="hamming", center=False, n_mels=m.n_mels, fmax=SR / 2)
    ref = librosa.feature.mfcc(S=10 * np.log10(np.maximum(mel, 10 ** (m.mfcc_floor_db / 10))), n_mfcc=m.n_mfcc)
    e = (m.delta_width - 1) // 2
    got = mfcc_features(wav, m)
    np.testing.assert_allclose(got[: m.n_mfcc], ref[:, e: e + got.shape[1]], rtol=1e-5, atol=1e-3)


def test_a_run_made_before_local_features_keeps_its_feature_definition(tmp_path):
    """config.json of an old run has no mfcc_floor_db: it loads with librosa's array-relative floor
    (the features it was trained on), never silently with the new one."""
    import librosa
    d = preset("tiny").to_dict()
    del d["model"]["mfcc_floor_db"]
    old = Config.from_json(json.dumps(d))
    assert old.model.mfcc_floor_db is None
    assert Config.from_json(old.to_json()).model.mfcc_floor_db is None     # round trip keeps it
    assert preset("tiny").model.mfcc_floor_db == -100.0                   # new runs: the absolute floor
    m = old.model
    wav = _speech_like(seconds=0.6, seed=3)
    legacy = librosa.feature.mfcc(y=wav, sr=SR, n_mfcc=m.n_mfcc, n_fft=m.mfcc_win, hop_length=m.mfcc_hop,
                                  win_length=m.mfcc_win, window="hamming", center=False, n_mels=m.n_mels,
                                  fmin=0.0, fmax=SR / 2)
    e = (m.delta_width - 1) // 2
    got = mfcc_features(wav, m)
    assert got[: m.n_mfcc].tobytes() == legacy[:, e: e + got.shape[1]].astype(np.float32).tobytes()
    assert not np.array_equal(got, mfcc_features(wav, preset("tiny").model))
    WaveNetAE(m)          # an old config still builds its model


def test_invalid_floor_is_refused():
    with pytest.raises(ValueError, match="mfcc_floor_db"):
        preset("tiny").with_overrides(["mfcc_floor_db=10"])


# --- the torch implementation against librosa ---------------------------------------------------------

def _librosa_features(wav, m, dtype=np.float32):
    """The old implementation's librosa calls (np.float32 is librosa's own filterbank dtype); dtype=np.float64
    runs the same chain in float64 (signal, STFT, filterbank and all): the reference float32 results are
    measured against."""
    import librosa
    wav = np.asarray(wav, dtype=dtype)
    mel = librosa.feature.melspectrogram(
        y=wav, sr=m.sample_rate, n_fft=m.mfcc_win, hop_length=m.mfcc_hop, win_length=m.mfcc_win,
        window="hamming", center=False, power=2.0, n_mels=m.n_mels, fmin=0.0, fmax=m.sample_rate / 2, dtype=dtype)
    log_mel = librosa.power_to_db(mel, ref=1.0, amin=10.0 ** (m.mfcc_floor_db / 10), top_db=None)
    mfcc = librosa.feature.mfcc(S=log_mel, n_mfcc=m.n_mfcc)
    d1 = librosa.feature.delta(mfcc, width=m.delta_width, order=1, axis=-1)
    d2 = librosa.feature.delta(mfcc, width=m.delta_width, order=2, axis=-1)
    e = (m.delta_width - 1) // 2
    n = mfcc.shape[-1] - 2 * e
    return np.concatenate([mfcc, d1, d2], axis=-2)[..., e: e + n]


def _signals():
    rng = np.random.default_rng(7)
    t = np.arange(SR) / SR
    return {"speech_like": _speech_like(seconds=1.5, seed=4),
            "noise": (0.3 * rng.standard_normal(SR)).astype(np.float32),
            "silence": np.zeros(SR // 2, np.float32),
            "tone": (0.9 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
            "near_floor": (1e-6 * rng.standard_normal(SR)).astype(np.float32)}     # ~ -100..-120 dB bands


def _configs():
    m = preset("tiny").model
    return {"tiny": m, "paper": preset("paper").model,
            "80mel_512fft": dataclasses.replace(m, n_mels=80, mfcc_win=512, mfcc_hop=128, n_mfcc=20,
                                                delta_width=5, mfcc_floor_db=-80.0),
            "8khz": dataclasses.replace(m, sample_rate=8000, mfcc_win=200, mfcc_hop=80, delta_width=3,
                                        mfcc_floor_db=-120.0)}


def _grid_bound(m) -> float:
    """What the log-mel grid may move a feature by, at most (see features.py, "the fast path"): half a
    GRID_DB step per log-mel value through a DCT row (sum |D_kn|), plus the rounded DCT matrix (half a
    2^-dct_bits unit per entry) times |log-mel - its frame mean| (< 200 dB for any signal here), both
    times max(1, sum |h|) of the delta filters (sum |h| is 4 for width 3's delta-delta, <= 0.33 for 9)."""
    d = features.dct_matrix(m.n_mfcc, m.n_mels)
    per_value = features.GRID_DB / 2 * np.abs(d).sum(1).max()
    matrix = 2.0 ** -(features.dct_bits(m.n_mfcc, m.n_mels) + 1) * m.n_mels * 200.0
    gain = max(1.0, *(np.abs(features.savgol_deltas(m.delta_width, o)).sum() for o in (1, 2)))
    return (per_value + matrix) * gain


@pytest.mark.parametrize("sig", list(_signals()))
@pytest.mark.parametrize("cfg", list(_configs()))
def test_torch_features_match_librosa(cfg, sig):
    """Tolerance against librosa's float32 chain (the old features): rtol 1e-5 and an absolute
    1e-6 * max|feature|. librosa rounds every stage to float32: log-mel values up to |floor| dB carry
    ~1 ulp each (7.6e-6 at 100 dB), the DCT adds n_mels of them (weights <= sqrt(2 / n_mels)) and c0
    itself is ~|floor| * sqrt(n_mels) (632 for the presets, ulp 6e-5); so its error scales with the
    largest value, not with each value (measured: up to 4e-7 * max|feature|, on the near-floor noise).
    Against the same chain in float64, ours is the float32 rounding (<= 1 ulp) of a value within the
    log-mel grid's worst-case bound (`_grid_bound`: 2.6e-4 for the presets; measured at most 3.5e-5 in
    all, c0's own ulp included), and on average within GRID_DB (7.6e-6; measured 0.1-2.8e-6, librosa
    float32's 0.2-11e-6)."""
    m, wav = _configs()[cfg], _signals()[sig]
    got = mfcc_features(wav, m)
    r32 = _librosa_features(wav, m)
    r64 = _librosa_features(wav, m, np.float64)
    assert got.shape == r32.shape == (3 * m.n_mfcc, features.n_feature_frames(len(wav), m))
    assert got.dtype == np.float32
    scale = float(np.abs(r64).max())
    err32, err_ours = np.abs(r32 - r64), np.abs(got - r64)
    diff = np.abs(got - r32)
    print(f"{cfg}/{sig}: |ours - librosa32| max {diff.max():.2e} mean {diff.mean():.2e}; vs float64: "
          f"ours max {err_ours.max():.2e} mean {err_ours.mean():.1e}, librosa32 max {err32.max():.2e} "
          f"mean {err32.mean():.1e} (max|feature| {scale:.0f}, grid bound {_grid_bound(m):.1e})")
    np.testing.assert_allclose(got, r32, rtol=1e-5, atol=1e-6 * scale)
    ulp = np.spacing(np.abs(r64).astype(np.float32)).astype(np.float64)
    assert np.all(err_ours <= ulp + _grid_bound(m))
    assert err_ours.mean() <= features.GRID_DB


def test_a_floored_frame_is_exact():
    """Digital silence: every band at the floor, c0 = sqrt(n_mels) * floor, all else exactly 0."""
    for m in _configs().values():
        f = mfcc_features(np.zeros(m.mfcc_win + 10 * m.mfcc_hop, np.float32), m)
        assert np.all(f[0] == np.float32(np.sqrt(m.n_mels) * m.mfcc_floor_db))
        assert not np.any(f[1:]) and not np.signbit(f[1:]).any()


@pytest.mark.parametrize("sr,n_fft,n_mels", [(16000, 400, 40), (16000, 512, 80), (8000, 200, 40),
                                             (22050, 1024, 128), (16000, 400, 128)])
def test_mel_filterbank_is_librosas(sr, n_fft, n_mels):
    """Same float64 operations as librosa.filters.mel: equal to its float64 bank to 1e-12 relative
    (bit-equal here); its default float32 bank is the float64 one rounded twice (<= 2 float32 ulps)."""
    import librosa
    fb = mel_filterbank(sr, n_fft, n_mels)
    ref64 = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, dtype=np.float64)
    ref32 = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)
    print(f"max |fb - librosa64| {np.abs(fb - ref64).max():.1e}, |fb - librosa32| {np.abs(fb - ref32).max():.1e}")
    assert fb.shape == ref64.shape == (n_mels, n_fft // 2 + 1)
    assert np.array_equal(fb > 0, ref64 > 0)
    np.testing.assert_allclose(fb, ref64, rtol=1e-12, atol=0)
    np.testing.assert_allclose(fb.astype(np.float32), ref32, rtol=2.4e-7, atol=0)


def test_deltas_and_dct_are_scipys():
    import scipy.fft
    import scipy.signal
    for width in (3, 5, 9, 15):
        for order in (1, 2):
            np.testing.assert_allclose(features.savgol_deltas(width, order),
                                       scipy.signal.savgol_coeffs(width, order, deriv=order, use="dot"),
                                       rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(features.dct_matrix(13, 40),
                               scipy.fft.dct(np.eye(40), type=2, norm="ortho", axis=0)[:13], atol=1e-15)
    np.testing.assert_array_equal(features.periodic_hamming(400), scipy.signal.get_window("hamming", 400))


def test_reference_is_the_librosa_definition():
    m = preset("tiny").model
    wav = _speech_like(seconds=0.5, seed=5)
    assert mfcc_features_ref(wav, m).tobytes() == _librosa_features(wav, m).astype(np.float32).tobytes()


def test_batch_is_row_by_row_and_tensor_is_numpy():
    """(B, T) gives each row's (T,) features bit for bit; a tensor gives a float32 tensor on its device
    with the numpy path's bits; awkward lengths (one frame exactly, an odd tail) and batch 1."""
    m = preset("tiny").model
    need = m.mfcc_win + (m.delta_width - 1) * m.mfcc_hop
    rng = np.random.default_rng(3)
    for T in (need, need + 1, need + m.mfcc_hop - 1, 7331):
        wav = (0.2 * rng.standard_normal((3, T))).astype(np.float32)
        wav[1, : T // 2] = 0.0
        batch = mfcc_features(wav, m)
        assert batch.shape == (3, 3 * m.n_mfcc, features.n_feature_frames(T, m)) and batch.dtype == np.float32
        for b in range(3):
            assert mfcc_features(wav[b], m).tobytes() == batch[b].tobytes()
            assert mfcc_features(wav[b: b + 1], m)[0].tobytes() == batch[b].tobytes()
        t = mfcc_features(torch.from_numpy(wav), m)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.numpy().tobytes() == batch.tobytes()
        rev = wav[2, ::-1]                      # a strided view, and float64 (taken as float32)
        assert mfcc_features(rev, m).tobytes() == mfcc_features(rev.astype(np.float64).copy(), m).tobytes()
    with pytest.raises(ValueError, match="too few"):
        mfcc_features(np.zeros(need - 1, np.float32), m)


def test_chunking_a_long_signal_changes_no_bit(monkeypatch):
    m = preset("tiny").model
    wav = _speech_like(seconds=1.0, seed=6)
    whole = mfcc_features(np.stack([wav, wav[::-1]]), m)
    monkeypatch.setitem(features.CHUNK_BYTES, "cpu", 7 * 8 * m.mfcc_win)     # 3 frames per pass of 2 rows
    assert mfcc_features(np.stack([wav, wav[::-1]]), m).tobytes() == whole.tobytes()


def test_cpu_autocast_changes_nothing():
    """Under bfloat16 autocast the features are computed as without it (autocast is off inside)."""
    m = preset("tiny").model
    wav = torch.from_numpy(_speech_like(seconds=0.8, seed=8))
    plain = mfcc_features(wav, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mfcc_features(wav, m)
    assert auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    np.testing.assert_allclose(auto.numpy(), _librosa_features(wav.numpy(), m), rtol=1e-5,
                               atol=1e-6 * float(plain.abs().max()))


def test_bfloat16_input():
    """A bfloat16 signal is widened exactly: its features are those of the float32 signal with the same
    values, bit for bit. Against the unrounded float32 signal the difference is the signal's bf16
    rounding (8 significant bits, ~ -50 dB noise relative to each sample): for broadband signals
    (speech-like, noise) within 0.25 absolute in every coefficient (measured 0.064 and 0.034). Not a
    bound for spectrally sparse signals: a pure tone's empty bands fill with that noise (c0 moved by up
    to ~250 for a 440 Hz tone, from the -100 dB floor)."""
    m = preset("tiny").model
    for name in ("speech_like", "noise"):
        wav = torch.from_numpy(_signals()[name])
        got = mfcc_features(wav.bfloat16(), m)
        assert got.dtype == torch.float32
        assert torch.equal(got, mfcc_features(wav.bfloat16().float(), m))
        diff = (got - mfcc_features(wav, m)).abs()
        print(f"{name}: bf16 input vs float32 input: max {diff.max():.3f}, mean {diff.mean():.4f}")
        assert diff.max() < 0.25


def test_legacy_config_accepts_a_tensor():
    d = preset("tiny").to_dict()
    del d["model"]["mfcc_floor_db"]
    m = Config.from_dict(d).model
    wav = _speech_like(seconds=0.6, seed=9)
    got = mfcc_features(torch.from_numpy(wav), m)
    assert isinstance(got, torch.Tensor) and got.numpy().tobytes() == mfcc_features(wav, m).tobytes()


def test_importing_features_and_generate_does_not_import_librosa():
    code = ("import sys, wavenet_ae.features, wavenet_ae.generate, wavenet_ae.encode; "
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'librosa'))")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --- on a GPU: the same numbers as on the CPU ------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _close_to_cpu(got: torch.Tensor, cpu: torch.Tensor, m, what: str):
    """Both devices compute in float64 and round log-mel values to the same grid; cuFFT and MKL (and the
    two log10s) differ in the last float64 bits, which move a log-mel value by one grid step only when
    it sits that close to a midpoint: nearly every value is the same bits, the others within the grid's
    bound (`_grid_bound`, twice: each side's error) plus one float32 ulp."""
    got, cpu = got.cpu().double(), cpu.double()
    diff = (got - cpu).abs()
    ulp = torch.from_numpy(np.spacing(np.abs(cpu.numpy()).astype(np.float32)).astype(np.float64))
    differ = (diff > 0).double().mean().item()
    print(f"{what}: max |cuda - cpu| {diff.max():.2e}, values not bit-equal: {differ:.3%}")
    assert torch.all(diff <= ulp + 2 * _grid_bound(m))
    assert differ < 0.01


@needs_gpu
@pytest.mark.parametrize("cfg", ["tiny", "80mel_512fft", "8khz"])
def test_cuda_features_match_the_cpu(cfg):
    m = _configs()[cfg]
    sigs = _signals()
    T = min(len(w) for w in sigs.values())
    wav = torch.from_numpy(np.stack([w[:T] for w in sigs.values()]))
    cpu = mfcc_features(wav, m)
    got = mfcc_features(wav.cuda(), m)
    assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == cpu.shape
    _close_to_cpu(got, cpu, m, f"{cfg} batch")
    for b in range(len(wav)):                # each row alone on the device
        _close_to_cpu(mfcc_features(wav[b].cuda(), m), cpu[b], m, f"{cfg} row {b}")


@needs_gpu
def test_cuda_features_ignore_autocast_and_tf32():
    m = preset("paper").model
    p = plan(m, preset("paper").data.n_win)
    wav = torch.from_numpy(np.stack([_speech_like(seconds=1.0, seed=s)[: p.enc_len] for s in range(8)])).cuda()
    plain = mfcc_features(wav, m)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = mfcc_features(wav, m)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert torch.equal(mfcc_features(wav.bfloat16(), m), mfcc_features(wav.bfloat16().float(), m))
