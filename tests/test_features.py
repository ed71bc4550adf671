"""Features are local: a frame is a function of the samples in its receptive field only, so a window's
features are bit-identical alone, in any batch, and cut from the whole file; runs made before that
keep the array-relative floor they were trained with."""
import json

import numpy as np
import pytest

from wavenet_ae.config import Config, preset
from wavenet_ae.data.slice_buffer import make_batch
from wavenet_ae.data.windows import cut_window
from wavenet_ae.features import mfcc_features
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
