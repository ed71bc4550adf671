"""Evaluation pieces on constructed cases, and the report end to end on a briefly trained run."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from wavenet_ae.evaluate import (Frames, abx_errors, label_at, linear_probe, mel_cepstral_distortion,
                                 triphone_tokens, write_item_file)


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


def _abx_corpus(seed=0, n_speakers=3, n_utts=4, n_phones=40):
    """Alignments of random phone strings over 4 phones (50-100 ms each) between pauses."""
    rng = np.random.default_rng(seed)
    alignments, speakers = [], []
    for s in range(n_speakers):
        for _ in range(n_utts):
            ali, t = [(0.0, 0.1, "pau")], 0.1
            for _ in range(n_phones):
                d = rng.uniform(0.05, 0.1)
                ali.append((t, t + d, str(rng.choice(list("abcd")))))
                t += d
            alignments.append(ali + [(t, t + 0.1, "pau")])
            speakers.append(f"s{s}")
    return alignments, speakers


def _frames(alignments, speakers, step, first_centre, features):
    out = []
    for ali, spk in zip(alignments, speakers):
        t = np.arange(first_centre, ali[-1][1], step)
        labels = label_at(ali, t)
        out.append(Frames(features(labels), t, spk, labels))
    return out


def test_abx_of_phone_one_hot_is_zero_and_of_noise_is_chance():
    pytest.importorskip("zrc_abx2")
    rng = np.random.default_rng(1)
    alignments, speakers = _abx_corpus()
    index = {p: i for i, p in enumerate("abcd")} | {"pau": 4, None: 4}
    one_hot = lambda labels: np.eye(5)[[index[y] for y in labels]] + 0.1 * rng.standard_normal((len(labels), 5))
    noise = lambda labels: rng.standard_normal((len(labels), 8))
    # frame grids of the latents (centres (i + 0.5) * 20 ms) and of the MFCCs (10 ms, first centre 52.5 ms)
    scores, setup = abx_errors(alignments, {
        "latent_grid": (0.02, _frames(alignments, speakers, 0.02, 0.01, one_hot)),
        "mfcc_grid": (0.01, _frames(alignments, speakers, 0.01, 0.0525, one_hot)),
        "noise": (0.01, _frames(alignments, speakers, 0.01, 0.0525, noise))})
    print(scores, setup)
    assert setup["a_groups"]["within"] > 20 and setup["a_groups"]["across"] > 20
    for name in ("latent_grid", "mfcc_grid"):
        assert scores[name]["within"] < 2.0 and scores[name]["across"] < 2.0
    assert 35 < scores["noise"]["within"] < 65 and 35 < scores["noise"]["across"] < 65


def test_item_file_times_select_the_frames_centred_in_the_phone(tmp_path):
    """zrc_abx2 assumes frame i is centred at (i + 0.5) * step and trims the last frame; the item
    file's times compensate, for any first frame centre."""
    abx_loader = pytest.importorskip("zrc_abx2.ABX_src.ABXDataset.abx_feature_loader")
    import torch
    alignments, speakers = _abx_corpus(n_speakers=1, n_utts=1)
    tokens = triphone_tokens("u", speakers[0], alignments[0])
    assert len(tokens) == 40 and {t.phone for t in tokens} <= set("abcd")
    for step, first in ((0.02, 0.01), (0.01, 0.0525), (0.01, 0.0)):
        write_item_file(tmp_path / "x.item", tokens, first, step)
        rows = [line.split() for line in (tmp_path / "x.item").read_text().splitlines()[1:]]
        t = np.arange(first, alignments[0][-1][1], step)
        for tok, row in zip(tokens, rows):
            i0, i1 = abx_loader.ABXFeatureLoader._start_end_indices(
                None, float(row[1]), float(row[2]), torch.zeros(len(t), 1), 1 / step)
            assert list(range(i0, i1)) == np.flatnonzero((t >= tok.onset) & (t <= tok.offset)).tolist()


def test_abx_without_the_package_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "zrc_abx2", None)          # makes `import zrc_abx2` fail
    alignments, speakers = _abx_corpus(n_speakers=2, n_utts=1)
    frames = _frames(alignments, speakers, 0.02, 0.01, lambda labels: np.ones((len(labels), 2)))
    with pytest.warns(UserWarning, match="zerospeech-libriabx2"):
        scores, _ = abx_errors(alignments, {"x": (0.02, frames)})
    assert scores is None


def test_evaluate_writes_the_report(tmp_path):
    """On the demo corpus plus two files whose content is NaN (one in training, one held out): training
    and evaluation skip them with the corpus warning and report on the rest."""
    import shutil
    import soundfile as sf
    from wavenet_ae.data import DEMO_CORPUS
    corpus = tmp_path / "corpus"
    shutil.copytree(DEMO_CORPUS, corpus)
    bad = 0.1 * np.ones(32000, np.float32)
    bad[1000] = np.nan
    for name in ("kal/kal_nan_train.wav", "ked/ked_nan_test.wav"):
        sf.write(corpus / name, bad, 16000, subtype="FLOAT")
    with open(corpus / "split.tsv", "a") as fh:
        fh.write("kal/kal_nan_train.wav\tkal\ttrain\nked/ked_nan_test.wav\tked\ttest\n")
    run = tmp_path / "run"
    small = ["n_enc=24", "n_latent=8", "n_codes=32", "n_res=12", "n_dil=12", "n_skp=24", "n_post=24",
             "n_lc_out=16", "n_block_layers=6", "n_batch=4", "validate_every=20", "vq_warmup_steps=5"]
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run), "--preset", "tiny",
                        "--data", str(corpus), "--max-steps", "20", "--set", *small],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"warning: skipping {corpus}/kal/kal_nan_train.wav: NaN/inf samples" in r.stderr.splitlines()
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.evaluate", "--run-dir", str(run), "--data", str(corpus),
                        "--n-resynth", "1", "--seconds", "0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"warning: skipping {corpus}/ked/ked_nan_test.wav: NaN/inf samples" in r.stderr.splitlines()
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["n_held_out_files"] == 12                            # the demo corpus's, not the NaN one
    for k in ("phone_latents", "phone_mfcc", "speaker_latents", "speaker_mfcc"):
        assert 0.0 <= rep["probe_accuracy"][k] <= 1.0
    assert rep["probe_accuracy"]["speaker_mfcc"] > 1.5 / 6          # MFCCs tell 6 voices apart
    rec = rep["reconstruction"]
    assert 0 < rec["ce"] < np.log(256) + 0.5                        # 20 steps: still near uniform
    assert rec["conditioning_gain"] == pytest.approx(rec["ce_shuffled_latents"] - rec["ce"])
    assert rep["resynthesis"][0]["mcd_db"] > 0
    if importlib.util.find_spec("zrc_abx2"):
        for feats in ("latents", "mfcc"):
            for speakers in ("within", "across"):
                assert 0.0 <= rep["abx"][feats][speakers] <= 100.0
        assert rep["abx"]["mfcc"]["across"] < 40                    # MFCCs separate phones
        assert rep["abx_setup"]["a_groups"]["within"] > 0 and rep["abx_setup"]["seconds"] > 0
    else:
        assert rep["abx"] is None
    for png in ("loss.png", "receptive_field.png", "codebook_usage.png", "sample0_spectrograms.png"):
        assert (run / "report" / png).stat().st_size > 1000
    md = (run / "report" / "report.md").read_text()
    assert "Linear probes" in md and "ABX error" in md
