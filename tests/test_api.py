"""wavenet_ae.load / Model: the Python API gives the CLIs' results, pays start-up once, checks its inputs."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import wavenet_ae
from conftest import make_run_dir
from wavenet_ae import generate
from wavenet_ae.config import Config
from wavenet_ae.data.corpus import load_audio
from wavenet_ae.encode import encode_signal, encode_signals
from wavenet_ae.model import WaveNetAE
from wavenet_ae.run_dir import load_run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    """A run dir of an untrained tiny VQ-VAE (quantising: no warm-up) with speakers alice and bob."""
    return make_run_dir(tmp_path / "run")


@pytest.fixture
def wav_file(tmp_path):
    n = 2500
    t = np.arange(n) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 150 * t) * np.hanning(n)
           + 0.02 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    p = tmp_path / "bob" / "in.wav"
    p.parent.mkdir()
    sf.write(p, wav, 16000, subtype="FLOAT")
    return p


def test_load_exposes_the_run(run_dir):
    m = wavenet_ae.load(run_dir, device="cpu")
    assert isinstance(m, wavenet_ae.Model)
    assert m.speakers == ["alice", "bob"] and m.step == 7 and m.sample_rate == 16000
    assert m.config == Config.from_json((run_dir / "config.json").read_text())
    assert m.device == torch.device("cpu") and next(m.model.parameters()).device.type == "cpu"
    assert isinstance(m.model, WaveNetAE) and not m.model.training
    assert "step=7" in repr(m) and "vqvae" in repr(m)


def test_encode_equals_the_cli_path_for_paths_arrays_tensors_and_lists(run_dir, wav_file):
    m = wavenet_ae.load(run_dir, device="cpu")
    run = load_run(run_dir)
    wav = load_audio(str(wav_file), 16000)
    ref_lat, ref_codes = encode_signal(run.model, wav)
    assert ref_lat.shape == (8, 16)                          # ceil(2500 / 320)
    for x in (wav_file, str(wav_file), wav, torch.from_numpy(wav), wav.astype(np.float64)):
        enc = m.encode(x)
        assert isinstance(enc, wavenet_ae.Encoding)
        assert enc.latents.dtype == np.float32 and enc.codes.dtype == np.int64
        np.testing.assert_array_equal(enc.latents, ref_lat)
        np.testing.assert_array_equal(enc.codes, ref_codes)
    latents, codes = m.encode(wav)                            # a NamedTuple: unpacks
    np.testing.assert_array_equal(codes, ref_codes)
    short = wav[:700]
    many = m.encode([wav_file, short])                       # batched as the encode CLI batches a corpus
    assert isinstance(many, list) and len(many) == 2
    cli = encode_signals(run.model, [wav, short], batch_size=16)
    for got, (lat, codes) in zip(many, cli):
        np.testing.assert_array_equal(got.latents, lat)
        np.testing.assert_array_equal(got.codes, codes)
    np.testing.assert_allclose(many[1].latents, encode_signal(run.model, short)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(many[1].codes, encode_signal(run.model, short)[1])


def test_encode_resamples_an_array_at_another_rate(run_dir, wav_file, tmp_path):
    import librosa
    m = wavenet_ae.load(run_dir, device="cpu")
    wav8k = librosa.resample(load_audio(str(wav_file), 16000), orig_sr=16000, target_sr=8000)
    p = tmp_path / "in8k.wav"
    sf.write(p, wav8k, 8000, subtype="FLOAT")
    got = m.encode(wav8k, sample_rate=8000)
    assert got.latents.shape == (8, 16)
    # the same resampling as a file read by load_audio at 8 kHz
    np.testing.assert_array_equal(got.latents, m.encode(p).latents)
    np.testing.assert_array_equal(m.encode(wav8k, sample_rate=16000).latents, m.encode(wav8k).latents)


def test_encode_refuses_bad_inputs_clearly(run_dir, wav_file, tmp_path):
    m = wavenet_ae.load(run_dir, device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.wav does not exist"):
        m.encode(tmp_path / "nope.wav")
    with pytest.raises(ValueError, match=r"1-D \(mono\) signal, got shape \(2, 100\)"):
        m.encode(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="empty signal"):
        m.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="NaN/inf"):
        m.encode(np.array([0.0, np.nan, 0.1], np.float32))
    with pytest.raises(ValueError, match="read from the file"):
        m.encode(wav_file, sample_rate=8000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    with pytest.raises(ValueError, match="bad.wav.*unreadable"):
        m.encode(bad)
    with pytest.raises(TypeError, match="got int"):
        m.encode(3)


def test_load_refuses_bad_arguments(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.*does not exist"):
        wavenet_ae.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        wavenet_ae.load(run_dir, device="cpu", engine="fast")
    with pytest.raises(ValueError, match="unknown weights 'fp8'"):
        wavenet_ae.load(run_dir, device="cpu", weights="fp8")


def _count_packs(monkeypatch):
    calls = []
    real = generate.pack_decoder

    def counting(*a, **kw):
        calls.append(kw.get("weight_dtype", a[2] if len(a) > 2 else None))
        return real(*a, **kw)
    monkeypatch.setattr(generate, "pack_decoder", counting)
    return calls


def test_resynthesize_equals_the_cli_path_and_packs_once(run_dir, wav_file, monkeypatch):
    m = wavenet_ae.load(run_dir, device="cpu")                 # engine / weights 'auto', as the CLI
    run = load_run(run_dir)
    wav = load_audio(str(wav_file), 16000)
    # the CLI: Generator(decoder, --engine auto, weight_dtype=--weights auto), resynthesize(...)
    cli_gen = generate.Generator(run.model.decoder, "auto", weight_dtype="auto")
    ref = generate.resynthesize(run.model, wav, 1, seed=3, generator=cli_gen)
    calls = _count_packs(monkeypatch)
    out = m.resynthesize(wav_file, speaker="bob", seed=3)
    assert out.dtype == np.float32 and out.shape == wav.shape
    np.testing.assert_array_equal(out, ref)
    assert len(calls) == 1
    np.testing.assert_array_equal(m.resynthesize(wav, speaker=1, seed=3), ref)     # by id; no re-pack
    assert not np.array_equal(m.resynthesize(wav, speaker=1, seed=4), ref)        # the seed matters
    assert len(calls) == 1
    # another engine / weight dtype is packed once more, then kept too
    py = m.resynthesize(wav, speaker=1, seed=3, engine="python", weights="fp32")
    m.resynthesize(wav[:400], speaker=0, engine="python", weights="fp32")
    assert len(calls) == 2 and calls[-1] == torch.float32
    np.testing.assert_array_equal(py, generate.resynthesize(run.model, wav, 1, engine="python", seed=3))


def test_convert_is_resynthesis_with_another_speaker(run_dir, wav_file):
    m = wavenet_ae.load(run_dir, device="cpu", engine="cpp", weights="fp32")
    run = load_run(run_dir)
    wav = load_audio(str(wav_file), 16000)
    alice = m.convert(wav_file, speaker="alice", seed=1)
    np.testing.assert_array_equal(alice, generate.resynthesize(run.model, wav, 0, engine="cpp", seed=1))
    # speaker None on a path in a speaker's folder: that speaker (bob), as the generate CLI does
    bob = m.resynthesize(wav_file, seed=1)
    np.testing.assert_array_equal(bob, m.convert(wav, "bob", seed=1))
    assert not np.array_equal(alice, bob)
    both = m.convert([wav_file, wav[:500]], speaker="alice", seed=1)
    assert isinstance(both, list) and len(both) == 2 and both[1].shape == (500,)
    np.testing.assert_array_equal(both[0], alice)


def test_unknown_speakers_list_the_known_ones(run_dir, wav_file):
    m = wavenet_ae.load(run_dir, device="cpu")
    with pytest.raises(KeyError, match="unknown speaker 'carol'; known speakers: alice, bob"):
        m.convert(wav_file, speaker="carol")
    with pytest.raises(ValueError, match="speaker id 2 out of range 0..1; known speakers: alice, bob"):
        m.convert(wav_file, speaker=2)
    with pytest.warns(UserWarning, match="no speaker given; using 'alice'"):
        out = m.resynthesize(np.zeros(400, np.float32), seed=0)
    assert out.shape == (400,)


def test_import_stays_light_and_exports_load():
    code = ("import sys, wavenet_ae; assert 'torch' not in sys.modules, 'torch imported'; "
            "from wavenet_ae import load, Model, Encoding; import wavenet_ae.api as a; "
            "assert load is a.load and Model is a.Model; print(wavenet_ae.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == wavenet_ae.__version__
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        wavenet_ae.nope


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_is_the_default_device_and_matches_the_cpu(run_dir, wav_file, monkeypatch):
    from wavenet_ae.upstream import Upstream
    g = wavenet_ae.load(run_dir)                                   # device None: cuda when available
    c = wavenet_ae.load(run_dir, device="cpu")
    assert g.device.type == "cuda" and next(g.model.parameters()).is_cuda
    eg, ec = g.encode(wav_file), c.encode(wav_file)
    print("latents |cuda - cpu| max", np.abs(eg.latents - ec.latents).max(), "codes agree",
          (eg.codes == ec.codes).mean())
    assert (eg.codes == ec.codes).mean() >= 0.75
    agree = eg.codes == ec.codes
    np.testing.assert_array_equal(eg.latents[agree], ec.latents[agree])      # the same codebook rows
    calls = _count_packs(monkeypatch)
    a = g.resynthesize(wav_file, seed=2)                           # engine auto: cuda
    b = g.resynthesize(wav_file, seed=2)
    assert len(calls) == 1 and a.dtype == np.float32 and a.shape == b.shape and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    w = [torch.from_numpy(load_audio(str(wav_file), 16000))]
    ug = Upstream(g).eval()(w)["hidden_states"][0].cpu()
    uc = Upstream(c).eval()(w)["hidden_states"][0]
    torch.testing.assert_close(ug, uc, rtol=1e-2, atol=1e-2)        # cuDNN may convolve in TF32
