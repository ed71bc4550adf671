"""Corpus index (bad input handling) and slice buffer (validity, exact resume, ranks)."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from wavenet_ae.config import preset
from wavenet_ae.data.corpus import (BadAudioWarning, CorpusError, CorpusWarning, index_corpus, load_audio,
                                    split_corpus)
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


def _nan_file(path, seconds=1.0):
    wav = 0.1 * np.ones(int(seconds * SR), np.float32)
    wav[len(wav) // 2] = np.nan
    sf.write(path, wav, SR, subtype="FLOAT")


@pytest.mark.parametrize("prefetch", [0, 3])
def test_restore_is_exact_after_bad_files_were_met(synth_corpus, prefetch):
    """The files found bad change which files make up a chunk (and an epoch's tail): the position
    carries them, so every restore point gives the identical remaining sequence."""
    m, p = _tiny()
    root = synth_corpus(n_speakers=3, per_speaker=3, seconds=(0.5, 0.9))
    _nan_file(root / "spk1" / "nan_a.wav")
    _nan_file(root / "spk2" / "nan_b.wav", 0.7)
    kw = dict(prefetch=prefetch, fraction=0.001, buffer_seconds=1.5)
    with pytest.warns(BadAudioWarning, match=r"nan_[ab]\.wav: NaN/inf samples"):
        corpus, ref = _buffer(root, m, p, **kw)
        states, batches = [ref.state()], []
        for _ in range(45):                   # several epochs
            batches.append(next(ref))
            states.append(ref.state())
    ref.close()
    assert len({s["epoch"] for s in states}) >= 3 and len(ref.bad) == 2
    for k in range(len(batches) - 1):
        _, buf = _buffer(root, m, p, **kw)
        buf.restore(json.loads(json.dumps(states[k])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadAudioWarning)
            for want in batches[k:k + 4]:
                got = next(buf)
                assert (got.files, got.starts) == (want.files, want.starts), f"restore point {k}"
                assert got.feats.numpy().tobytes() == want.feats.numpy().tobytes()
        buf.close()
    assert states[-1]["bad"] == sorted(ref.bad) and len(json.dumps(states[-1])) < 512


def test_a_version_1_position_still_restores(synth_corpus):
    m, p = _tiny()
    root = synth_corpus()
    _, ref = _buffer(root, m, p)
    want = [next(ref) for _ in range(3)]
    _, buf = _buffer(root, m, p)
    buf.restore({"version": 1, "seed": 7, "rank": 0, "world_size": 1, "corpus": ref.digest,
                 "epoch": 0, "cursor": 0, "drawn": 0})
    assert [next(buf).starts for _ in range(3)] == [b.starts for b in want]


def test_a_failing_worker_never_hangs_close(synth_corpus, monkeypatch):
    """The prefetch worker fails (not a corpus error) while its queue is full: close() returns and the
    consumer gets the error."""
    import threading
    m, p = _tiny()
    root = synth_corpus()
    _, buf = _buffer(root, m, p, prefetch=2)
    real = SliceBuffer._generate
    delivered = threading.Event()

    def failing(self, position):
        for i, b in enumerate(real(self, position)):
            if i == 3:
                delivered.set()
                raise RuntimeError("injected failure")
            yield b
    monkeypatch.setattr(SliceBuffer, "_generate", failing)
    next(buf)                                  # worker: batches 1-3, queue (2) full, then the failure
    assert delivered.wait(10)
    closer = threading.Thread(target=buf.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hangs on a failed worker with a full queue"
    _, buf = _buffer(root, m, p, prefetch=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        for _ in range(5):
            next(buf)
    buf.close()


def test_the_worker_leaves_the_warning_filters_alone(synth_corpus):
    """Warning filters are process-wide: a filter set while the prefetch worker runs survives it."""
    m, p = _tiny()
    root = synth_corpus()
    _, buf = _buffer(root, m, p, prefetch=2)
    with warnings.catch_warnings():
        next(buf)
        warnings.filterwarnings("error", message="sentinel filter")
        next(buf)
        buf.close()
        assert any(f[1] is not None and f[1].pattern == "sentinel filter" for f in warnings.filters)


def test_skip_warnings_read_as_one_line(synth_corpus):
    """As a user's terminal shows them: `warning: skipping PATH: reason`, without Python's echo of the
    source line that warned."""
    import subprocess
    import sys
    root = synth_corpus(n_speakers=1, per_speaker=2)
    (root / "spk0" / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    _nan_file(root / "spk0" / "nan.wav")
    code = ("import sys; from wavenet_ae.data.corpus import index_corpus, load_or_skip; "
            "c = index_corpus(sys.argv[1], 16000, 1000); [load_or_skip(u.path, 16000) for u in c.utterances]")
    r = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"warning: skipping {root}/spk0/broken.wav: unreadable")
    assert lines[1] == f"warning: skipping {root}/spk0/nan.wav: NaN/inf samples"


def test_files_the_split_file_leaves_out_are_warned_about(synth_corpus):
    root = synth_corpus(n_speakers=2, per_speaker=3)
    rows = ["path\tspeaker\tsplit", "spk0/u0.wav\tspk0\ttrain", "spk0/u1.wav\tspk0\ttrain",
            "spk1/u0.wav\tspk1\ttrain", "spk1/u1.wav\tspk1\tvalid", "spk1/u2.wav\tspk1\tdev"]
    (root / "split.tsv").write_text("\n".join(rows) + "\n")
    corpus = index_corpus(root, SR, 1000)
    with pytest.warns(CorpusWarning, match=r"2 of 6 files are not used: 1 not listed, 1 under a split other "
                                           r"than train/valid/test \(dev\); e\.g\. .*spk0/u2.wav"):
        parts = split_corpus(corpus, root, 0.1)
    assert len(parts["train"].utterances) == 3 and len(parts["valid"].utterances) == 1


def test_feature_stats_skip_files_with_bad_content(synth_corpus):
    from wavenet_ae.train import feature_stats
    root = synth_corpus(n_speakers=1, per_speaker=2)
    _nan_file(root / "spk0" / "nan.wav")
    cfg = preset("tiny")
    corpus = index_corpus(root, SR, 1000)
    with pytest.warns(BadAudioWarning, match="nan.wav: NaN/inf samples"):
        mean, std = feature_stats(corpus, cfg)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()


def test_validation_batches_load_only_what_they_use_across_speakers(synth_corpus, monkeypatch):
    """A held-out set far larger than the batches: only n_batch * max_batches files are decoded, taken
    with the speakers in turn (not the first files in path order, which are a few speakers'), and a
    file with bad content is replaced by the next."""
    from wavenet_ae.data import slice_buffer
    m, p = _tiny()
    root = synth_corpus(n_speakers=12, per_speaker=8, seconds=(0.5, 0.6))
    _nan_file(root / "spk0" / "a_nan.wav", 0.6)
    corpus = index_corpus(root, SR, p.total_len)
    loaded = []
    real = slice_buffer.load_or_skip

    def counting(path, sr):
        loaded.append(path)
        return real(path, sr)
    monkeypatch.setattr(slice_buffer, "load_or_skip", counting)
    with pytest.warns(BadAudioWarning, match="a_nan.wav"):
        batches = slice_buffer.fixed_batches(corpus, m, p, n_batch=4, max_batches=4)
    assert len(batches) == 4 and len(loaded) == 4 * 4 + 1            # 16 used + the NaN file
    speakers = {int(s) for b in batches for s in b.speaker}
    assert speakers == set(range(12))
    files = [f for b in batches for f in b.files]
    assert len(set(files)) == 16
    for b in batches:                                                 # neighbours: other utterances
        assert all(x != y for x, y in zip(b.files, b.files[1:]))


def _record_chunks(buf):
    """Wrap buf._load_chunk: buf.loaded collects (epoch of the position before the load, file index)."""
    buf.loaded = []
    load = buf._load_chunk

    def recording(files, cursor, tail):
        chunks, i, counts = load(files, cursor, tail)
        buf.loaded += [(buf.state()["epoch"], idx) for idx, _, _ in chunks]
        return chunks, i, counts
    buf._load_chunk = recording


@pytest.mark.parametrize("old_world,new_world", [(2, 3), (3, 2), (2, 1)])
def test_a_resume_on_another_world_size_neither_skips_nor_repeats_a_file(synth_corpus, old_world, new_world):
    """Preemption: W ranks stop mid-epoch, W' ranks resume. Every file of that epoch is read once: by
    an old rank before the stop, or by a new rank after it; then the new ranks shard the next epoch
    between them. A position saved during the re-sharded epoch restores exactly."""
    m, p = _tiny()
    root = synth_corpus(n_speakers=4, per_speaker=6, seconds=(0.5, 0.9))
    kw = dict(fraction=0.01, buffer_seconds=1.2)
    states = []
    old_loaded = set()
    for rank in range(old_world):
        corpus, buf = _buffer(root, m, p, rank=rank, world_size=old_world, **kw)
        _record_chunks(buf)
        for _ in range(9):                    # ends mid-chunk (drawn > 0) on some rank
            next(buf)
        assert buf.state()["epoch"] == 0
        states.append(json.loads(json.dumps(buf.state())))
        old_loaded |= {f for e, f in buf.loaded if e == 0}
    assert any(s["drawn"] > 0 for s in states)
    new_loaded, next_epoch = [], []
    for rank in range(new_world):
        _, buf = _buffer(root, m, p, rank=rank, world_size=new_world, **kw)
        assert "re-sharded" in buf.restore_all(states)
        _record_chunks(buf)
        while buf.state()["epoch"] < 2:
            next(buf)
        new_loaded += [f for e, f in buf.loaded if e == 0]
        next_epoch.append({f for e, f in buf.loaded if e == 1})
    assert len(new_loaded) == len(set(new_loaded)), "a file was read twice after the re-shard"
    assert not old_loaded & set(new_loaded), "a file begun before the stop was read again"
    assert old_loaded | set(new_loaded) == set(range(len(corpus.utterances))), "a file was skipped"
    assert not set.intersection(*next_epoch) if new_world > 1 else True
    assert set.union(*next_epoch) == set(range(len(corpus.utterances)))

    # exact resume inside the re-sharded epoch (its position carries the explicit file list)
    _, ref = _buffer(root, m, p, rank=0, world_size=new_world, **kw)
    ref.restore_all(states)
    next(ref)
    mid = json.loads(json.dumps(ref.state()))
    assert mid["epoch"] == 0 and "files" in mid
    want = [next(ref) for _ in range(6)]
    _, buf = _buffer(root, m, p, rank=0, world_size=new_world, **kw)
    assert buf.restore_all([mid] + [dict(mid, rank=r) for r in range(1, new_world)]) is None
    assert [(b.files, b.starts) for b in (next(buf) for _ in range(6))] == [(b.files, b.starts) for b in want]


def test_a_loader_process_gives_the_same_batches_and_restores_exactly(synth_corpus):
    m, p = _tiny()
    root = synth_corpus(n_speakers=3, per_speaker=3)
    _, ref = _buffer(root, m, p, prefetch=3, fraction=0.001)
    want = [next(ref) for _ in range(12)]
    ref.close()
    _, buf = _buffer(root, m, p, prefetch=3, fraction=0.001, loader="process")
    got = [next(buf) for _ in range(6)]
    state = json.loads(json.dumps(buf.state()))
    buf.close()
    _, again = _buffer(root, m, p, prefetch=3, fraction=0.001, loader="process")
    again.restore(state)
    got += [next(again) for _ in range(6)]
    again.close()
    for g, w in zip(got, want):
        assert (g.files, g.starts) == (w.files, w.starts)
        assert g.enc_wav.tobytes() == w.enc_wav.tobytes() and g.dec_wav.tobytes() == w.dec_wav.tobytes()
        assert g.speaker_ids.tolist() == w.speaker_ids.tolist()


def test_a_loader_process_that_dies_is_an_error_not_a_hang(synth_corpus):
    import os
    import signal
    m, p = _tiny()
    _, buf = _buffer(synth_corpus(), m, p, prefetch=2, loader="process")
    next(buf)
    os.kill(buf._thread.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="data loader process died"):
        for _ in range(1000):                  # what it had queued, then the error
            next(buf)
    buf.close()


def test_a_loader_process_ends_with_its_killed_parent(synth_corpus, tmp_path):
    """SIGKILL of the training process leaves no one to close the loader: it notices and exits."""
    import os
    import signal
    import subprocess
    import sys
    import time
    root = synth_corpus()
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_data import _buffer, _tiny
m, p = _tiny()
_, buf = _buffer({str(root)!r}, m, p, prefetch=2, loader="process")
next(buf)
print(buf._thread.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1])
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    t = time.time()
    while time.time() - t < 20:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the loader process outlived its parent by 20 s")
