"""Corpus index (bad input handling) and slice buffer (validity, exact resume, ranks)."""
import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from wavenet_ae.config import preset
from wavenet_ae.data.corpus import BadAudioWarning, CorpusError, index_corpus, load_audio
from wavenet_ae.data.slice_buffer import SliceBuffer
from wavenet_ae.ops import mu_law_encode
from wavenet_ae.rfield import plan

SR = 16000


def _tiny():
    cfg = preset("tiny")
    return cfg.model, plan(cfg.model, cfg.data.n_win)


def _buffer(root, m, p, **kw):
    corpus = index_corpus(root, SR, p.total_len)
    args = dict(n_batch=4, buffer_seconds=2.0, fraction=0.01, seed=7, prefetch=0)
    args.update(kw)
    return corpus, SliceBuffer(corpus, m, p, **args)


def test_bad_files_are_named_skipped_and_counted(synth_corpus, tmp_path):
    m, p = _tiny()
    root = synth_corpus(n_speakers=2, per_speaker=2)
    bad = root / "spk0"
    (bad / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    sf.write(bad / "empty.wav", np.zeros(0, np.float32), SR)
    sf.write(bad / "short.flac", np.zeros(100, np.float32), SR)
    (bad / "music.mp3").write_bytes(b"ID3")
    nan = 0.1 * np.ones(SR, np.float32)
    nan[500] = np.nan
    sf.write(bad / "nan.wav", nan, SR, subtype="FLOAT")
    stereo = np.stack([np.sin(np.arange(SR) / 7), np.zeros(SR)], 1).astype(np.float32)
    sf.write(root / "spk1" / "stereo48k.wav", np.repeat(stereo, 3, axis=0), 3 * SR)
    with pytest.warns(BadAudioWarning) as caught:
        corpus = index_corpus(root, SR, p.total_len)
    reasons = dict((path.split("/")[-1], r) for path, r in corpus.rejected)
    assert set(reasons) == {"corrupt.wav", "empty.wav", "short.flac", "music.mp3"}
    assert reasons["corrupt.wav"].startswith("unreadable") and reasons["empty.wav"] == "zero-length"
    assert reasons["short.flac"].startswith("too short") and "extension" in reasons["music.mp3"]
    assert all(any(name in str(w.message) for w in caught) for name in reasons)
    assert "skipped 4" in corpus.summary()
    # stereo 48 kHz is accepted: mixed to mono and resampled to one second at 16 kHz
    st = next(u for u in corpus.utterances if u.path.endswith("stereo48k.wav"))
    assert st.n_samples == SR and load_audio(st.path, SR).shape == (SR,)
    # NaN content is found when the file is loaded: skipped with a warning, never batched
    buf = SliceBuffer(corpus, m, p, n_batch=4, buffer_seconds=100.0, fraction=0.01, seed=0, prefetch=0)
    with pytest.warns(BadAudioWarning, match="nan.wav: NaN"):
        files = {f for _ in range(10) for f in next(buf).files}
    nan_idx = next(i for i, u in enumerate(corpus.utterances) if u.path.endswith("nan.wav"))
    assert nan_idx not in files and nan_idx in buf.bad


def test_manifest_with_missing_file_and_all_bad_is_a_clear_error(synth_corpus, tmp_path):
    root = synth_corpus(n_speakers=1, per_speaker=2)
    manifest = tmp_path / "list.tsv"
    manifest.write_text("path\tspeaker\n" f"{root}/spk0/u0.wav\talice\n" "nowhere.wav\tbob\n")
    with pytest.warns(BadAudioWarning, match="nowhere.wav: missing file"):
        corpus = index_corpus(manifest, SR, 1000)
    assert [u.speaker for u in corpus.utterances] == ["alice"] and corpus.speakers == ["alice"]
    manifest.write_text("nowhere.wav\tbob\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorpusError, match="no usable audio"):
            index_corpus(manifest, SR, 1000)
    with pytest.raises(CorpusError, match="does not exist"):
        index_corpus(tmp_path / "missing_dir", SR, 1000)


@pytest.mark.parametrize("seed", range(4))
def test_windows_lie_inside_one_file_for_random_configs(synth_corpus, seed):
    rng = np.random.default_rng(seed)
    cfg = preset("tiny")
    m = cfg.model
    m.n_block_layers = int(rng.integers(3, 11))
    m.n_kern = int(rng.integers(2, 4))
    m.jitter_prob = float(rng.choice([0.0, 0.12]))
    m.lc_upsample_kern_sizes = [int(s + rng.integers(0, 6)) for s in m.lc_upsample_strides]
    p = plan(m, int(rng.integers(1, 5)) * m.hop)
    root = synth_corpus(seconds=(p.total_len / SR * 1.01, p.total_len / SR * 1.6), seed=seed)
    corpus, buf = _buffer(root, m, p, fraction=0.05)
    wavs = {}
    for _ in range(12):
        b = next(buf)
        assert b.feats.shape == (4, m.n_in, p.n_frames) and b.dec_q.shape == (4, p.dec_len)
        for i, (f, t0) in enumerate(zip(b.files, b.starts)):
            wav = wavs.setdefault(f, load_audio(corpus.utterances[f].path, SR))
            assert t0 - p.before >= 0 and t0 + p.after <= len(wav)
            dec = torch.from_numpy(wav[t0 - p.dec_context: t0 + p.n_win].copy())
            assert torch.equal(b.dec_q[i], mu_law_encode(dec, m.n_quant))
            assert b.speaker[i] == corpus.speaker_id(corpus.utterances[f].speaker)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_restore_gives_the_identical_remaining_sequence(synth_corpus, prefetch):
    m, p = _tiny()
    root = synth_corpus(n_speakers=3, per_speaker=3)
    _, ref = _buffer(root, m, p, prefetch=prefetch, fraction=0.001)
    states, batches = [ref.state()], []
    for _ in range(40):                       # crosses chunk and epoch boundaries
        batches.append(next(ref))
        states.append(ref.state())
    ref.close()
    assert len({s["epoch"] for s in states}) > 1 and len({s["cursor"] for s in states}) > 2
    for k in (0, 1, 7, 13, 26, 39):
        _, buf = _buffer(root, m, p, prefetch=prefetch, fraction=0.001)
        buf.restore(json.loads(json.dumps(states[k])))
        for want in batches[k:k + 6]:
            got = next(buf)
            assert got.files == want.files and got.starts == want.starts
            assert got.dec_q.numpy().tobytes() == want.dec_q.numpy().tobytes()
            assert got.feats.numpy().tobytes() == want.feats.numpy().tobytes()
        buf.close()
    assert len(json.dumps(states[-1])) < 512


def test_restore_rejects_a_position_from_another_run(synth_corpus):
    m, p = _tiny()
    root = synth_corpus()
    _, buf = _buffer(root, m, p)
    state = buf.state()
    _, other = _buffer(root, m, p, seed=8)
    with pytest.raises(ValueError, match="seed"):
        other.restore(state)


def test_ranks_read_disjoint_files_covering_the_corpus(synth_corpus):
    m, p = _tiny()
    root = synth_corpus(n_speakers=3, per_speaker=4)
    seen = []
    for rank in range(2):
        corpus, buf = _buffer(root, m, p, rank=rank, world_size=2, fraction=0.002)
        files, windows = set(), set()
        while buf.state()["epoch"] == 0:
            b = next(buf)
            files |= set(b.files)
            windows |= set(zip(b.files, b.starts))
        seen.append((files, windows))
    (f0, w0), (f1, w1) = seen
    assert not f0 & f1 and not w0 & w1
    assert f0 | f1 == set(range(len(corpus.utterances)))
