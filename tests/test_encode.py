"""Corpus-scale encoding: batches equal one file at a time, the output tree mirrors the input and never
leaves --out, resume after a kill, torchrun sharding, unreadable files, the ZeroSpeech submission and
its ZR2019 bitrate. Run dirs are hand-made (random weights), as in tests/test_generate.py."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from wavenet_ae.config import preset
from wavenet_ae.data.corpus import BadAudioWarning, load_audio
from wavenet_ae.encode import encode_signal, encode_signals, main as encode_main
from wavenet_ae.model import WaveNetAE
from wavenet_ae.run_dir import load_run

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def make_run_dir(root: Path, bottleneck: str = "vqvae", seed: int = 0) -> Path:
    """config.json + speakers.json + checkpoints/step-*.pt ({"model": state_dict}) of a random tiny model."""
    cfg = preset("tiny").with_overrides([f"model.bottleneck={bottleneck}"])
    cfg.model.vq_warmup_steps = 0            # quantise as a trained run does
    d = root / f"run-{bottleneck}"
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.json").write_text(cfg.to_json())
    (d / "speakers.json").write_text(json.dumps(["a", "b"]))
    torch.manual_seed(seed)
    torch.save({"model": WaveNetAE(cfg.model).state_dict()}, d / "checkpoints" / "step-00000007.pt")
    return d


def _wav(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * (100 + 37 * seed) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


# lengths far apart (a field of the encoder is ~1000 samples): a short file batched with long ones
LENGTHS = {"top.wav": 4000, "s1/a.wav": 700, "s1/b.flac": 40000, "s1/deep/c.wav": 321,
           "s2/d.wav": 16000, "s2/e.wav": 9999}


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i, (rel, n) in enumerate(LENGTHS.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, _wav(n, i), 16000)
    (root / "s2" / "notes.md").write_text("not audio")
    (root / "s2" / "x.bin").write_bytes(b"\0" * 10)          # not audio: left out, counted
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {b: make_run_dir(root, b) for b in ("ae", "vae", "vqvae")}


def _expected(run_dir: Path, path: Path):
    run = load_run(run_dir)
    return encode_signal(run.model, load_audio(str(path), 16000))


@pytest.mark.parametrize("bottleneck", ["ae", "vae", "vqvae"])
def test_batches_equal_one_file_at_a_time(runs, bottleneck):
    torch.set_num_threads(1)
    model = load_run(runs[bottleneck]).model
    lens = [800, 32000, 333, 5000, 47, 12345, 640, 641]
    wavs = [_wav(n, i) for i, n in enumerate(lens)]
    got = encode_signals(model, wavs, batch_size=3)
    for w, (z, c) in zip(wavs, got):
        z1, c1 = encode_signal(model, w)
        assert z.shape == (math.ceil(len(w) / 320), 16) and z.dtype == np.float32
        diff = np.abs(z - z1).max()
        print(f"{bottleneck} T={len(w)}: max |batched - alone| = {diff:.3g}")
        assert diff <= 1e-5
        if bottleneck == "vqvae":
            assert c.dtype == np.int64 and np.array_equal(c, c1)
        else:
            assert c is None and c1 is None
    # the padding of a short file's batch is another file's loud audio, not zeros: still no leak
    loud = np.ones(20000, np.float32) * 0.9
    (zs, _), _ = encode_signals(model, [wavs[0], loud], batch_size=2)
    assert np.abs(zs - encode_signal(model, wavs[0])[0]).max() <= 1e-5


def test_corpus_folder_mirrors_the_tree(runs, corpus, tmp_path, capsys):
    bad = corpus / "s2" / "broken.wav"
    bad.write_bytes(b"RIFF not really a wav")
    link = tmp_path / "elsewhere"
    link.mkdir()
    sf.write(link / "l.wav", _wav(2000, 9), 16000)
    os.symlink(link, corpus / "s3")                       # a linked folder is followed, like the corpus walker
    out = tmp_path / "out"
    with pytest.warns(BadAudioWarning) as caught:
        assert encode_main(["--run-dir", str(runs["vqvae"]), "--input", str(corpus), "--out", str(out),
                            "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "encoded 7 files" in err and "1 unreadable" in err and "left out 1 non-audio" in err  # x.bin (.md: not listed)
    assert [str(w.message).split(":")[0] for w in caught] == [f"skipping {bad}"]
    want = {**LENGTHS, "s3/l.wav": 2000}
    for rel, n in want.items():
        stem = rel.rsplit(".", 1)[0]
        z, c = np.load(out / f"{stem}.npy"), np.load(out / f"{stem}.codes.npy")
        assert z.dtype == np.float32 and z.shape == (math.ceil(n / 320), 16)
        assert c.dtype == np.int64 and c.shape == (z.shape[0],)
        z1, c1 = _expected(runs["vqvae"], corpus / rel)
        assert np.abs(z - z1).max() <= 1e-5 and np.array_equal(c, c1)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted([f"{r.rsplit('.', 1)[0]}{s}" for r in want for s in (".npy", ".codes.npy")]
                             + ["bitrate.json"])
    # ZR2019 bitrate over all codes, computed here independently
    codes = np.concatenate([np.load(out / f"{r.rsplit('.', 1)[0]}.codes.npy") for r in want])
    p = np.array(list(Counter(codes.tolist()).values())) / len(codes)
    seconds = sum(want.values()) / 16000
    br = json.loads((out / "bitrate.json").read_text())
    assert br["bits_per_second"] == pytest.approx(len(codes) * -(p * np.log2(p)).sum() / seconds, rel=1e-9)
    assert br["symbols"] == len(codes) and f"{br['bits_per_second']:.2f} bits/s" in err


def _manifest(path: Path, rows: list[str]) -> Path:
    path.write_text("path\tspeaker\n" + "".join(f"{r}\tspk\n" for r in rows))
    return path


def test_manifest_entries_never_escape_out(runs, corpus, tmp_path, capsys):
    mdir = corpus                                          # the default input root
    secret = tmp_path / "secret.wav"                      # an audio file outside the manifest's folder
    sf.write(secret, _wav(1000, 3), 16000)
    out = tmp_path / "nest" / "out"
    base = ["--run-dir", str(runs["ae"]), "--out", str(out), "--device", "cpu", "--no-progress"]
    for n, bad in enumerate(["../secret.wav", str(secret), "s1/../../../etc/x.flac"]):
        m = _manifest(mdir / f"m{n}.tsv", ["s1/a.wav", bad])       # line 3 escapes
        with pytest.raises(SystemExit) as e:
            encode_main(base + ["--input", str(m)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"{m}:3: {bad} is not under" in err and "--input-root" in err
    assert not out.exists() and not (tmp_path / "nest").exists()       # nothing written anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "secret.wav"]

    # --input-root above every entry: the same manifest maps inside OUT (relative to that root)
    m = _manifest(mdir / "ok.tsv", ["s1/a.wav", str(secret), "s2/./d.wav", str(corpus / "top.wav")])
    assert encode_main(base + ["--input", str(m), "--input-root", str(tmp_path)]) == 0
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*.npy"))
    assert got == ["corpus/s1/a.npy", "corpus/s2/d.npy", "corpus/top.npy", "secret.npy"]
    assert np.allclose(np.load(out / "secret.npy"), _expected(runs["ae"], secret)[0], rtol=1e-5, atol=1e-5)
    # the default root, the manifest's folder: '..' entries that stay under it are fine
    m2 = _manifest(corpus / "m.tsv", ["s1/../s1/a.wav", str(corpus / "s2" / "e.wav")])
    out2 = tmp_path / "out2"
    assert encode_main(base[:2] + ["--out", str(out2), "--no-progress", "--input", str(m2)]) == 0
    assert sorted(str(p.relative_to(out2)) for p in out2.rglob("*.npy")) == ["s1/a.npy", "s2/e.npy"]
    # two entries writing one output are refused
    m3 = _manifest(corpus / "m3.tsv", ["s1/a.wav", "s1/b.flac", "s1/a.flac"])
    with pytest.raises(SystemExit):
        encode_main(base[:2] + ["--out", str(tmp_path / "o3"), "--input", str(m3)])
    err = capsys.readouterr().err
    assert f"{m3}:2 and {m3}:4 would both write" in err and not (tmp_path / "o3").exists()


def test_resume_after_a_kill(runs, tmp_path, capsys):
    corpus = tmp_path / "c"
    for i in range(10):
        (corpus / f"s{i % 2}").mkdir(parents=True, exist_ok=True)
        sf.write(corpus / f"s{i % 2}" / f"u{i}.wav", _wav(3000 + 500 * i, i), 16000)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--run-dir", str(runs["vqvae"]), "--input", str(corpus), "--device", "cpu", "--no-progress",
            "--batch-size", "1"]
    assert encode_main(args + ["--out", str(ref)]) == 0
    capsys.readouterr()
    proc = subprocess.Popen([sys.executable, "-m", "wavenet_ae.encode", *args, "--out", str(out)],
                            env={**ENV, "WAVENET_AE_TEST_ENCODE_DELAY": "0.3"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120                        # a hang guard, not a timing assertion
    while len(list(out.rglob("u*.npy"))) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p for p in out.rglob("u*.npy") if not p.name.endswith(".codes.npy")}
    assert 3 <= len(done) < 10, "the process was not killed mid-run"
    victim = sorted(done)[0]                                 # and one more lost by hand
    victim.unlink()
    assert encode_main(args + ["--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"encoded {10 - len(done) + 1} files" in err and f"skipped {len(done) - 1} already done" in err
    for p in ref.rglob("*.npy"):
        assert np.array_equal(np.load(p), np.load(out / p.relative_to(ref))), p
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())          # no temporary files left
    # everything done: a rerun writes nothing; --overwrite redoes all
    assert encode_main(args + ["--out", str(out)]) == 0
    assert "encoded 0 files" in capsys.readouterr().err
    assert encode_main(args + ["--out", str(out), "--overwrite"]) == 0
    assert "encoded 10 files" in capsys.readouterr().err


def test_torchrun_two_ranks_write_each_file_once(runs, corpus, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--run-dir", str(runs["vqvae"]), "--input", str(corpus), "--device", "cpu", "--no-progress"]
    assert encode_main(args + ["--out", str(one)]) == 0
    capsys.readouterr()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "wavenet_ae.encode", *args, "--out", str(two)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # the all-reduced count: 6 encoded in all (a file written by both ranks would count twice)
    assert "encoded 6 files" in r.stderr and "skipped 0 already done" in r.stderr and "(2 ranks)" in r.stderr
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".npy":
            assert np.array_equal(np.load(one / f), np.load(two / f)), f
    assert json.loads((one / "bitrate.json").read_text()) == json.loads((two / "bitrate.json").read_text())


# The rules a submission must pass, from the ZeroSpeech toolkit's source (zerospeech/benchmarks:
# zerospeech/submissions/abxLS.py AbxLSSubmissionValidator with zerospeech/validators numpy_dtype_check /
# numpy_dimensions_check / numpy_col_comparison / file_list_checker; FileListItem.from_dir = rglob('*.npy');
# submissions/_model/meta_file.py MetaFile; tasks/abx/abxLS_phoneme/params.py ABX2Parameters). The package
# itself is not a test dependency: it pins pydantic<2 (this environment has pydantic 2) and fetches its
# dataset index from download.zerospeech.com on import.
ABX2_KEYS = {"cuda", "feature_size", "speaker_mode", "context", "distance_mode", "max_size_group",
             "max_x_across", "seed", "score_file_type", "result_filename"}
BENCHMARKS = {"prosAudit", "sLM21", "abxLS", "abx17", "abx15", "tde17", "tde15"}


def _check_submission(sub: Path, audio: list[Path]) -> list[np.ndarray]:
    files = sorted(sub.rglob("*.npy"))
    assert sorted(f.stem for f in files) == sorted(p.stem for p in audio)        # file_list_checker (stems)
    arrays = [np.load(f) for f in files]
    assert all(a.dtype == np.dtype("float") and a.ndim == 2 for a in arrays)     # float64, 2-D
    assert len({a.shape[1] for a in arrays}) == 1                               # numpy_col_comparison(1)
    meta = yaml.safe_load((sub / "meta.yaml").read_text())
    assert meta["benchmark_name"] in BENCHMARKS and isinstance(meta["open_source"], bool)
    mi, pub = meta["model_info"], meta["publication"]
    assert isinstance(mi["system_description"], str) and mi["system_description"]
    assert isinstance(mi["train_set"], str)
    assert isinstance(pub["authors"], str) and isinstance(pub["institution"], str)
    assert isinstance(pub["publication_year"], int)
    params = yaml.safe_load((sub / "params.yaml").read_text())
    assert set(params) == ABX2_KEYS and params["score_file_type"] in (".npy", ".txt")
    assert params["feature_size"] == 0.02                                        # 320 samples at 16 kHz
    return [np.load(sub / (p.rsplit(".", 1)[0] + ".npy")) for p in LENGTHS]


@pytest.mark.parametrize("codes", ["embedding", "onehot"])
def test_zerospeech_submission_vqvae(runs, corpus, tmp_path, capsys, codes):
    sub = tmp_path / "sub"
    assert encode_main(["--run-dir", str(runs["vqvae"]), "--input", str(corpus), "--out", str(sub),
                        "--format", "zerospeech", "--zerospeech-codes", codes, "--device", "cpu",
                        "--no-progress"]) == 0
    err = capsys.readouterr().err
    arrays = _check_submission(sub, [corpus / r for r in LENGTHS])
    cb = load_run(runs["vqvae"]).model.bottleneck.codebook.numpy()
    all_codes = []
    for rel, a in zip(LENGTHS, arrays):
        z1, c1 = _expected(runs["vqvae"], corpus / rel)
        all_codes.append(c1)
        if codes == "onehot":
            assert a.shape == (len(c1), 64) and np.array_equal(a, np.eye(64)[c1])
        else:
            assert a.shape == z1.shape and np.array_equal(a, cb[c1].astype(np.float64))   # exactly the rows
    # ZR2019: every frame (line) a symbol, repeats kept; entropy over the whole output; audio seconds
    rows = Counter(tuple(r) for a in arrays for r in a)
    n = sum(rows.values())
    p = np.array(list(rows.values())) / n
    want = n * -(p * np.log2(p)).sum() / (sum(LENGTHS.values()) / 16000)
    br = json.loads((sub / "bitrate.json").read_text())
    assert br["bits_per_second"] == pytest.approx(want, rel=1e-9)
    assert len(rows) == len(set(np.concatenate(all_codes).tolist())) == br["distinct_symbols"]
    assert f"{br['bits_per_second']:.2f} bits/s" in yaml.safe_load((sub / "meta.yaml").read_text())[
        "model_info"]["system_description"]
    assert "bitrate (ZeroSpeech 2019)" in err and "fill in meta.yaml's publication.authors" in err


def test_zerospeech_submission_ae_and_errors(runs, corpus, tmp_path, capsys):
    sub = tmp_path / "sub"
    base = ["--run-dir", str(runs["ae"]), "--input", str(corpus), "--device", "cpu", "--no-progress"]
    assert encode_main(base + ["--out", str(sub), "--format", "zerospeech"]) == 0
    arrays = _check_submission(sub, [corpus / r for r in LENGTHS])
    for rel, a in zip(LENGTHS, arrays):
        assert np.allclose(a, _expected(runs["ae"], corpus / rel)[0], atol=1e-5)
    assert not (sub / "bitrate.json").exists()                   # continuous latents: no symbol rate
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        encode_main(base + ["--out", str(tmp_path / "o"), "--format", "zerospeech", "--zerospeech-codes", "onehot"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "needs a VQ-VAE" in err and len(err.splitlines()) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        encode_main(base + ["--out", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err


def test_vqvae_in_its_warm_up_has_no_codes(tmp_path, corpus, capsys):
    """A VQ-VAE run still in its warm-up (step < vq_warmup_steps: latents not quantised) encodes a corpus
    without codes files, and refuses one-hot codes in one line (it crashed saving None as codes)."""
    d = make_run_dir(tmp_path, "vqvae")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["vq_warmup_steps"] = 500                     # the checkpoint is step 7
    (d / "config.json").write_text(json.dumps(cfg))
    assert encode_main(["--run-dir", str(d), "--input", str(corpus), "--out", str(tmp_path / "o"),
                        "--no-progress"]) == 0
    assert len(list((tmp_path / "o").rglob("*.npy"))) == len(LENGTHS)
    assert not list((tmp_path / "o").rglob("*.codes.npy")) and not (tmp_path / "o/bitrate.json").exists()
    assert encode_main(["--run-dir", str(d), "--input", str(corpus), "--out", str(tmp_path / "e"),
                        "--no-progress", "--format", "zerospeech"]) == 0          # embeddings: fine
    assert "bitrate" not in (tmp_path / "e/meta.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        encode_main(["--run-dir", str(d), "--input", str(corpus), "--out", str(tmp_path / "z"), "--no-progress",
                     "--format", "zerospeech", "--zerospeech-codes", "onehot"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "VQ warm-up" in err and "--zerospeech-codes embedding" in err
