"""wavenet-ae export and model files: a safetensors round trip, no pickle on the loading path, clear errors."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import wavenet_ae
from wavenet_ae import export
from conftest import make_run_dir
from wavenet_ae.run_dir import MODEL_FILE_FORMAT, ModelFileError, RunDirError, load_model_file, load_run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    """A run dir of an untrained tiny VQ-VAE (quantising) with non-trivial feature statistics."""
    return make_run_dir(tmp_path / "run", speakers=("alice", "bob", "carol"), step=12, feature_stats=True)


@pytest.fixture
def wav(tmp_path):
    n = 2000
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * np.hanning(n)
            + 0.02 * np.random.default_rng(1).standard_normal(n)).astype(np.float32)


def _export(run_dir, out, *extra):
    assert export.main(["--run-dir", str(run_dir), "--out", str(out), *extra]) == 0
    return out


def _no_torch_load(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("torch.load called on the model file path")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_round_trip_is_bit_identical_without_torch_load(run_dir, wav, tmp_path, monkeypatch):
    out = _export(run_dir, tmp_path / "out" / "model.safetensors")
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]        # no temporary left
    a = wavenet_ae.load(run_dir, device="cpu", engine="cpp", weights="fp32")
    _no_torch_load(monkeypatch)
    b = wavenet_ae.load(out, device="cpu", engine="cpp", weights="fp32")
    assert b.config == a.config and b.speakers == a.speakers == ["alice", "bob", "carol"] and b.step == 12
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k].dtype == sa[k].dtype and torch.equal(sb[k], sa[k]), k
    ea, eb = a.encode(wav), b.encode(wav)
    np.testing.assert_array_equal(eb.latents, ea.latents)
    np.testing.assert_array_equal(eb.codes, ea.codes)
    np.testing.assert_array_equal(b.convert(wav, "carol", seed=5), a.convert(wav, "carol", seed=5))


def test_metadata_names_format_config_speakers_step_and_source(run_dir, tmp_path):
    out = _export(run_dir, tmp_path / "model.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert meta["format"] == MODEL_FILE_FORMAT and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == json.loads((run_dir / "config.json").read_text())
    assert json.loads(meta["speakers"]) == ["alice", "bob", "carol"] and meta["step"] == "12"
    assert meta["source"] == "run/checkpoints/step-00000012.pt" and meta["dtype"] == "float32"
    assert meta["wavenet_ae_version"] == wavenet_ae.__version__
    assert torch.float16 not in dtypes and torch.float32 in dtypes


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_storage_loads_back_as_float32(run_dir, wav, tmp_path, name, dtype):
    full = _export(run_dir, tmp_path / "full.safetensors")
    half = _export(run_dir, tmp_path / f"{name}.safetensors", "--dtype", name)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    a = load_run(run_dir).model.state_dict()
    b = load_model_file(half).model.state_dict()
    for k in a:
        if a[k].is_floating_point():
            assert b[k].dtype == torch.float32 and torch.equal(b[k], a[k].to(dtype).float()), k
        else:
            assert b[k].dtype == a[k].dtype and torch.equal(b[k], a[k]), k
    la = wavenet_ae.load(run_dir, device="cpu").encode(wav).latents
    lb = wavenet_ae.load(half, device="cpu").encode(wav).latents
    assert lb.dtype == np.float32 and lb.shape == la.shape


class _Evil:
    """Unpickling this creates the marker file: what a malicious 'model file' would do."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["pickle0", "pickle4", "torch.save"])
def test_a_pickle_named_safetensors_is_refused_never_unpickled(tmp_path, monkeypatch, how):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.safetensors"
    if how == "torch.save":
        torch.save({"x": _Evil(marker)}, evil)
    else:
        evil.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=int(how[-1])))
    assert not marker.exists()
    for loader in (lambda: wavenet_ae.load(evil, device="cpu"), lambda: load_model_file(evil),
                   lambda: load_run(evil)):
        with pytest.raises(ModelFileError, match=f"model file {evil}") as e:
            loader()
        assert "\n" not in str(e.value)
        assert not marker.exists()
    assert "not a safetensors model file" in str(e.value)
    if how != "pickle0":                        # protocol 0 has no signature
        assert "pickles can run code" in str(e.value)
    # and the CLIs say it in one line
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.encode", "--run-dir", str(evil), "--input", str(evil),
                        "--out", str(tmp_path / "x.npy"), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(evil) in r.stderr, r.stderr
    assert not marker.exists()


def _tensors(run_dir):
    return {k: v.contiguous() for k, v in load_run(run_dir).model.state_dict().items()}


def _meta(run_dir, **change):
    meta = {"format": MODEL_FILE_FORMAT, "format_version": "1", "config": (run_dir / "config.json").read_text(),
            "speakers": json.dumps(["alice"]), "step": "3"}
    meta.update(change)
    return {k: v for k, v in meta.items() if v is not None}


@pytest.mark.parametrize("change,message", [
    ({"format": None}, "not a wavenet_ae model file .metadata format=None"),
    ({"format": "other.model"}, "not a wavenet_ae model file .metadata format='other.model'"),
    ({"format_version": "2"}, "format_version 2 is newer"),
    ({"format_version": "one"}, "metadata format_version='one' is not an integer"),
    ({"config": None}, "metadata has no 'config'"),
    ({"config": "{not json"}, "metadata 'config' is not valid JSON"),
    ({"config": '{"model": {"bottleneck": "zip"}}'}, "invalid config: .*bottleneck='zip'"),
    ({"config": '{"model": {"n_layers": 3}}'}, "invalid config"),
    ({"config": "[1, 2]"}, "invalid config: not a JSON object"),
    ({"speakers": '{"a": 1}'}, "metadata 'speakers' is not a JSON list of names"),
    ({"step": "1.5"}, "metadata 'step' is not an integer"),
])
def test_bad_metadata_is_a_clear_error_naming_the_file(run_dir, tmp_path, change, message):
    p = tmp_path / "m.safetensors"
    save_file(_tensors(run_dir), str(p), metadata=_meta(run_dir, **change))
    with pytest.raises(ModelFileError, match=f"model file {p}: {message}"):
        wavenet_ae.load(p, device="cpu")


def test_header_lengths_that_look_like_a_pickle_signature_load(run_dir, tmp_path):
    """A safetensors file starts with its header's length (u64, little-endian): a low byte 0x80 is a
    pickle's first byte, and the file must still load."""
    from safetensors.torch import save
    tensors = _tensors(run_dir)
    for pad in range(0, 300):
        data = save(tensors, metadata=_meta(run_dir, pad="x" * pad))
        if data[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    p = tmp_path / "m.safetensors"
    p.write_bytes(data)
    assert load_model_file(p).speakers == ["alice"]


def test_no_metadata_at_all(run_dir, tmp_path):
    p = tmp_path / "bare.safetensors"
    save_file(_tensors(run_dir), str(p))
    with pytest.raises(ModelFileError, match=f"model file {p}: not a wavenet_ae model file"):
        load_model_file(p)


def test_missing_extra_or_misshapen_tensors_are_clear_errors(run_dir, tmp_path):
    good = _tensors(run_dir)
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "decoder.embed.weight"},
                    "does not fit its config: missing tensors decoder.embed.weight"),
        "extra": ({**good, "head.weight": torch.zeros(2)}, "does not fit its config: unexpected tensors head.weight"),
        "shape": ({**good, "speaker.weight": torch.zeros(3, 16)},
                  r"tensor speaker.weight has shape \(3, 16\); the config needs \(16, 16\)"),
        "dtype": ({**good, "bottleneck.steps_seen": torch.zeros((), dtype=torch.float32)},
                  "tensor bottleneck.steps_seen is torch.float32; expected torch.int64"),
    }
    assert "decoder.embed.weight" in good and tuple(good["speaker.weight"].shape) == (16, 16)
    for name, (tensors, message) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(p), metadata=_meta(run_dir))
        with pytest.raises(ModelFileError, match=f"model file {p}.*{message}"):
            load_model_file(p)
    p = tmp_path / "cut.safetensors"
    save_file(good, str(p), metadata=_meta(run_dir))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=f"model file {p}: not a valid safetensors file"):
        load_model_file(p)


def test_export_cli_errors_and_console_script(run_dir, tmp_path, wav):
    r = subprocess.run(["wavenet-ae", "export", "--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"wavenet-ae export: error: run dir {tmp_path / 'nope'} does not exist"]
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.export", "--run-dir", str(run_dir), "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is a directory" in r.stderr and r.stderr.count("\n") == 1
    # an existing file is replaced whole; a model file re-exported (here to fp16) is a valid source too
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    r = subprocess.run(["wavenet-ae", "export", "--run-dir", str(run_dir), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and f"wrote {out}" in r.stderr and "step 12" in r.stderr, r.stderr
    _export(out, tmp_path / "m16.safetensors", "--dtype", "fp16")
    assert load_model_file(tmp_path / "m16.safetensors").step == 12
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors", "m16.safetensors", "run"]
    # every verb's --run-dir takes a model file: encode's CLI writes the same latents
    src = tmp_path / "in.wav"
    sf.write(src, wav, 16000, subtype="FLOAT")
    from wavenet_ae import encode
    for i, where in enumerate((run_dir, out)):
        assert encode.main(["--run-dir", str(where), "--input", str(src), "--out", str(tmp_path / f"l{i}.npy"),
                            "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "l0.npy"), np.load(tmp_path / "l1.npy"))
    with pytest.raises(RunDirError):
        load_run(tmp_path / "l0.npy")
