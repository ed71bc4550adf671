"""Evaluation pieces on constructed cases, and the report end to end on a briefly trained run."""
import json
import subprocess
import sys

import numpy as np
import pytest

from wavenet_ae.evaluate import Frames, label_at, linear_probe, mel_cepstral_distortion


def test_labels_follow_the_alignment():
    ali = [(0.0, 0.1, "pau"), (0.1, 0.25, "ah"), (0.25, 0.3, "t")]
    assert label_at(ali, np.array([0.05, 0.1, 0.2, 0.29, 0.31])) == ["pau", "ah", "ah", "t", None]


def test_mcd_is_zero_for_identical_audio_and_grows_with_distortion():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    a = (0.3 * np.sin(2 * np.pi * 200 * t) + 0.01 * rng.standard_normal(16000)).astype(np.float32)
    assert mel_cepstral_distortion(a, a, 16000) == pytest.approx(0.0, abs=1e-6)
    noisy = a + 0.05 * rng.standard_normal(16000).astype(np.float32)
    very = a + 0.3 * rng.standard_normal(16000).astype(np.float32)
    assert 0 < mel_cepstral_distortion(a, noisy, 16000) < mel_cepstral_distortion(a, very, 16000)


def test_probe_separates_separable_labels_and_not_random_ones():
    rng = np.random.default_rng(0)

    def utt(spk, n=200):
        y = rng.integers(0, 3, n)
        x = np.eye(3)[y] * 3 + rng.standard_normal((n, 3)) * 0.3
        return Frames(x, np.arange(n) * 0.02, spk, [str(v) for v in y])
    train, test = [utt("a"), utt("b")], [utt("a"), utt("b")]
    assert linear_probe(train, test, "phone") > 0.95
    assert linear_probe(train, test, "speaker") < 0.65          # speakers share the distribution


def test_evaluate_writes_the_report(tmp_path):
    run = tmp_path / "run"
    small = ["n_enc=24", "n_latent=8", "n_codes=32", "n_res=12", "n_dil=12", "n_skp=24", "n_post=24",
             "n_lc_out=16", "n_block_layers=6", "n_batch=4", "validate_every=20"]
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run), "--preset", "tiny",
                        "--max-steps", "20", "--set", *small], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.evaluate", "--run-dir", str(run), "--n-resynth", "1",
                        "--seconds", "0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((run / "report" / "report.json").read_text())
    for k in ("phone_latents", "phone_mfcc", "speaker_latents", "speaker_mfcc"):
        assert 0.0 <= rep["probe_accuracy"][k] <= 1.0
    assert rep["probe_accuracy"]["speaker_mfcc"] > 1.5 / 6          # MFCCs tell 6 voices apart
    rec = rep["reconstruction"]
    assert 0 < rec["ce"] < np.log(256) + 0.5                        # 20 steps: still near uniform
    assert rec["conditioning_gain"] == pytest.approx(rec["ce_shuffled_latents"] - rec["ce"])
    assert rep["resynthesis"][0]["mcd_db"] > 0
    for png in ("loss.png", "receptive_field.png", "codebook_usage.png", "sample0_spectrograms.png"):
        assert (run / "report" / png).stat().st_size > 1000
    assert "Linear probes" in (run / "report" / "report.md").read_text()
