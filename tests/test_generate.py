"""Incremental generation: engines vs the teacher-forced forward pass, engines vs each other given the
same uniforms, the op's contract, and the generate/encode CLIs on a hand-made run dir.

Tolerances (fp32): incremental logits vs `WaveNet.forward` on the same sequence within 1e-4 absolute
(logits here are O(1..10)); between engines the same. Given the same uniforms, sampled classes must
be identical until the first near-tie: the first step where two engines emit different classes must
be one where u lies within 1e-5 of a CDF boundary of the reference (python) engine's distribution;
after it the engines may legitimately diverge (different float summation orders) and nothing more is
asserted. Logits are compared up to and including that step.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from wavenet_ae import ops
from wavenet_ae.config import ModelConfig, preset
from wavenet_ae.generate import Generator, available_engines, main as generate_main, pack_decoder
from wavenet_ae.model import WaveNetAE
from wavenet_ae.model.decoder import WaveNet

LOGIT_TOL = 1e-4
TIE_EPS = 1e-5      # |CDF - u| below this is a near-tie (fp32 cumsum rounding alone reaches ~1e-5)

needs_cpp = pytest.mark.skipif(not ops.has_kernel("wavenet_generate", "cpu"),
                               reason="wavenet_ae._C without generation kernels (rebuild the extension)")
needs_cuda = pytest.mark.skipif(not ("cuda" in available_engines()),
                                reason="no CUDA GPU or no CUDA kernels in wavenet_ae._C")


pytestmark = pytest.mark.usefixtures("one_thread")


def _geometry(name: str) -> ModelConfig:
    if name == "tiny":
        return preset("tiny").model
    if name == "paper_narrow":   # the paper's 2 x 10 layers (R = 2047), channels narrowed to odd sizes
        return ModelConfig(n_res=20, n_dil=13, n_skp=36, n_post=44, n_lc_out=24, n_global_embed=8)
    if name == "k3":             # 3-tap dilated convs, few layers
        return ModelConfig(n_kern=3, n_blocks=1, n_block_layers=4, n_res=16, n_dil=16, n_skp=24, n_post=32,
                           n_quant=64, n_lc_out=12, n_global_embed=8)
    raise ValueError(name)


def _decoder(name: str, seed: int = 0) -> WaveNet:
    """A random decoder whose output distributions are peaked enough that samples depend on the
    state (an untrained decoder's softmax is nearly uniform)."""
    torch.manual_seed(seed)
    dec = WaveNet(_geometry(name)).eval()
    with torch.no_grad():
        dec.post2.weight.mul_(30.0)
        for layer in dec.layers:                      # stronger conditioning, so lc matters
            layer.lc_proj.weight.mul_(3.0)
    return dec


def _cpu_paths() -> list[str]:
    if not ops.has_kernel("wavenet_generate", "cpu"):
        return ["generic"]
    return ["generic"] + (["avx2"] if ops.wavenet_generate_cpu_path("auto") == "avx2" else [])


def _teacher_forced_case(dec: WaveNet, B: int, N: int, seed: int = 1):
    """dec_q (B, N + R), per-step conditioning (B, C, N + R - 1), g, and forward's logits (B, N, nq)."""
    m_lc, m_g = dec.layers[0].lc_proj.in_channels, dec.layers[0].gc_proj.in_features
    g0 = torch.Generator().manual_seed(seed)
    R = dec.receptive_field
    K, d0 = dec.layers[0].dil_conv.kernel_size[0], dec.layers[0].dilation
    nq = dec.embed.num_embeddings
    dec_q = torch.randint(0, nq, (B, N + R), generator=g0)
    lc_win = torch.randn(B, m_lc, N + R - 1 - (K - 1) * d0, generator=g0)   # what forward reads
    g = torch.randn(B, m_g, generator=g0)
    with torch.no_grad():
        ref = dec(dec_q[:, :-1], lc_win, g).transpose(1, 2)                 # (B, N, nq)
    # step i of the engines predicts dec_q[i + 1]; forward's conditioning index j sits at step
    # j + (K - 1) d0 (its first layer's output j). Earlier steps only fill queues: pad with zeros.
    lc_steps = torch.cat([torch.zeros(B, m_lc, (K - 1) * d0), lc_win], 2)
    return dec_q, lc_steps, g, ref


def _report(name, got, ref):
    d = (got - ref).abs()
    print(f"{name}: max |diff| {d.max().item():.2e}, mean {d.mean().item():.2e}, max |ref| {ref.abs().max().item():.2f}")
    return d.max().item()


# ---------------------------------------------------------------------------------------------------
# teacher forcing: incremental engines == forward
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry,B", [("tiny", 1), ("tiny", 3), ("paper_narrow", 2), ("k3", 3)])
def test_python_engine_teacher_forced_logits_equal_forward(geometry, B):
    dec = _decoder(geometry)
    R = dec.receptive_field
    dec_q, lc_steps, g, ref = _teacher_forced_case(dec, B, N=40)
    gen = Generator(dec, "python")
    smp, lg = gen.run(lc_steps, g, dec_q[:, 0], forced=dec_q[:, 1:], want_logits=True, chunk=97)
    assert torch.equal(smp, dec_q[:, 1:])                  # teacher forcing emits the forced classes
    assert lg.shape == (B, dec_q.shape[1] - 1, dec.embed.num_embeddings)
    assert _report(f"python vs forward [{geometry}, B={B}]", lg[:, R - 1:], ref) < LOGIT_TOL
    assert ref.std() > 1.0                                 # the comparison is not between near-zeros


@needs_cpp
@pytest.mark.parametrize("path", _cpu_paths())
@pytest.mark.parametrize("geometry,B", [("tiny", 1), ("tiny", 3), ("tiny", 16), ("paper_narrow", 3),
                                        ("paper_narrow", 16), ("k3", 5)])
def test_cpp_engine_teacher_forced_logits_equal_forward(geometry, B, path):
    dec = _decoder(geometry)
    R = dec.receptive_field
    dec_q, lc_steps, g, ref = _teacher_forced_case(dec, B, N=40)
    gen = Generator(dec, "cpp", cpu_path=path)
    assert gen.cpu_path == path
    smp, lg = gen.run(lc_steps, g, dec_q[:, 0], forced=dec_q[:, 1:], want_logits=True, chunk=300)
    assert torch.equal(smp, dec_q[:, 1:])
    assert _report(f"cpp/{path} vs forward [{geometry}, B={B}]", lg[:, R - 1:], ref) < LOGIT_TOL


# ---------------------------------------------------------------------------------------------------
# free-running generation: engines agree sample for sample until the first near-tie
# ---------------------------------------------------------------------------------------------------

def _near_ties(logits: torch.Tensor, u: torch.Tensor, eps: float = TIE_EPS) -> torch.Tensor:
    """(B, T) bool: u lies within eps of a CDF boundary of softmax(logits) (float64)."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)[..., :-1]          # boundaries between classes
    return ((cdf - u.double()[..., None]).abs() < eps).any(-1)


def _compare_free_running(dec, other: Generator, B: int, T: int, seed: int = 3):
    m_lc, m_g = dec.layers[0].lc_proj.in_channels, dec.layers[0].gc_proj.in_features
    g0 = torch.Generator().manual_seed(seed)
    R = dec.receptive_field
    lc = torch.randn(B, m_lc, R + T, generator=g0)
    g = torch.randn(B, m_g, generator=g0)
    u = torch.rand(B, T, generator=g0)
    q_ref, lg_ref = Generator(dec, "python").generate(lc, g, u=u, want_logits=True, chunk=211)
    q, lg = other.generate(lc, g, u=u, want_logits=True, chunk=173)
    near = _near_ties(lg_ref, u)                                           # (B, T)
    differ = q != q_ref
    T_ = q.shape[1]
    first_diff = torch.where(differ.any(1), differ.float().argmax(1), torch.full((B,), T_))
    print(f"{other.describe()} B={B}: first differing step per item {first_diff.tolist()} of T={T}; "
          f"near-ties (|CDF - u| < {TIE_EPS}) at {int(near.sum())} of {near.numel()} steps")
    for b in range(B):
        t = int(first_diff[b])
        # identical classes until the first near-tie: a difference may only start where u lies within
        # float rounding of a CDF boundary; before it, the states are equal and so are the logits
        assert t == T_ or near[b, t], f"item {b}: samples differ at step {t}, which is not a near-tie"
        n = min(t + 1, T_)
        assert (lg[b, :n] - lg_ref[b, :n]).abs().max() < LOGIT_TOL
    assert first_diff.sum() >= B * T // 2, "the engines diverged early for most items: suspicious"
    # the samples are not trivial: more than a handful of distinct classes
    assert len(torch.unique(q_ref)) > 5
    return q, q_ref


@needs_cpp
@pytest.mark.parametrize("path", _cpu_paths())
@pytest.mark.parametrize("geometry,B", [("tiny", 1), ("tiny", 3), ("tiny", 16), ("paper_narrow", 3), ("k3", 4)])
def test_cpp_engine_samples_like_python_engine(geometry, B, path):
    dec = _decoder(geometry)
    _compare_free_running(dec, Generator(dec, "cpp", cpu_path=path), B, T=200)


@needs_cpp
def test_cpp_paths_chunks_and_batch_composition_give_identical_samples():
    """Deterministic engine: the chunking of the loop and the other items of a batch change nothing
    (per item, the avx2 tiles and the generic loops add in the same order whatever the batch)."""
    dec = _decoder("tiny")
    R, T, B = dec.receptive_field, 400, 5
    g0 = torch.Generator().manual_seed(7)
    lc = torch.randn(B, 32, R + T, generator=g0)
    g = torch.randn(B, 16, generator=g0)
    u = torch.rand(B, T, generator=g0)
    for path in _cpu_paths():
        gen = Generator(dec, "cpp", cpu_path=path)
        whole = gen.generate(lc, g, u=u, chunk=10_000)
        assert torch.equal(gen.generate(lc, g, u=u, chunk=29), whole)
        for b in (0, 3):
            assert torch.equal(gen.generate(lc[b:b + 1], g[b:b + 1], u=u[b:b + 1]), whole[b:b + 1])


def test_conditioning_equals_each_layers_projections():
    """`cond` of every chunk (one matmul into the head of one reused buffer, Generator.run) equals each
    layer's lc_proj(lc) + gc_proj(g) + dil_conv bias computed in float64: max |diff| <= 1e-5 (cond is
    O(10) here; float32 sums of 24 + 8 products), whole or in chunks (S = 50 in chunks of 16: a short
    last chunk)."""
    dec = _decoder("paper_narrow")
    B, S = 3, 50
    g0 = torch.Generator().manual_seed(11)
    lc = torch.randn(B, 24, S, generator=g0)
    g = torch.randn(B, 8, generator=g0)
    ref = torch.cat([(layer.lc_proj.weight.double()[:, :, 0] @ lc.double()).transpose(1, 2)
                     + (g.double() @ layer.gc_proj.weight.double().t())[:, None]
                     + layer.dil_conv.bias.double() for layer in dec.layers], 2)      # (B, S, L * 2 n_dil)
    gen = Generator(dec, "python")
    gcb = g @ gen.packed.gc_proj + gen.packed.cond_bias
    assert _report("cond vs float64 per-layer projections", gen.conditioning(lc, gcb).double(), ref) <= 1e-5
    seen = []                                                   # (buffer address, copy) of each chunk's cond

    def record(lc_c, gcb_c, out=None):
        c = Generator.conditioning(gen, lc_c, gcb_c, out)
        seen.append((c.data_ptr(), c.clone()))
        return c

    gen.conditioning = record
    gen.run(lc, g, torch.zeros(B, dtype=torch.int64), chunk=16)
    assert [c.shape[1] for _, c in seen] == [16, 16, 16, 2]
    assert len({p for p, _ in seen}) == 1                       # one buffer; the last chunk takes its head
    assert _report("chunked cond vs float64", torch.cat([c for _, c in seen], 1).double(), ref) <= 1e-5


@needs_cpp
def test_cpp_engine_threads_split_the_batch_without_changing_samples():
    dec = _decoder("tiny")
    R, T, B = dec.receptive_field, 200, 7
    g0 = torch.Generator().manual_seed(8)
    lc, g, u = torch.randn(B, 32, R + T, generator=g0), torch.randn(B, 16, generator=g0), torch.rand(B, T, generator=g0)
    for path in _cpu_paths():
        gen = Generator(dec, "cpp", cpu_path=path)
        one = gen.generate(lc, g, u=u)
        torch.set_num_threads(3)    # uneven split of 7 items
        assert torch.equal(gen.generate(lc, g, u=u), one), path


def test_history_is_teacher_forced_and_generation_is_seeded():
    dec = _decoder("k3")
    R, T = dec.receptive_field, 50
    lc, g = torch.randn(2, 12, R + T), torch.randn(2, 8)
    gen = Generator(dec, "python")
    a = gen.generate(lc, g, seed=5)
    assert a.shape == (2, T) and a.dtype == torch.int64 and 0 <= a.min() and a.max() < 64
    assert torch.equal(a, gen.generate(lc, g, seed=5))
    assert not torch.equal(a, gen.generate(lc, g, seed=6))
    # the history steers generation: a different prefix changes the samples
    hist = torch.randint(0, 64, (2, R), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, gen.generate(lc, g, seed=5, history=hist))


def test_sampler_reference_is_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    for u, want in [(0.0, 0), (0.05, 0), (0.1001, 1), (0.35, 2), (0.61, 3), (0.9999, 3)]:
        assert ops.sample_from_logits_ref(logits, torch.tensor([u])).item() == want


@needs_cpp
def test_kernel_sampler_matches_reference_away_from_ties():
    """Post-net with identity-like weights: the logits are whatever we put in b_post2, so the kernel's
    sampler is checked directly against sample_from_logits_ref for many u."""
    dec = _decoder("k3")
    w = pack_decoder(dec).weights
    nq = w.n_quant
    torch.manual_seed(0)
    S = 500
    logits = torch.randn(nq) * 3
    w = w._replace(w_post2=torch.zeros_like(w.w_post2), b_post2=logits.clone())
    u = torch.rand(1, S)
    cond = torch.zeros(1, S, sum(2 * 16 for _ in w.dilations))
    for path in _cpu_paths():
        queues = torch.zeros(1, sum(w.queue_rows), w.n_res)
        smp, _ = ops.wavenet_generate(w, cond, u, None, queues, torch.zeros(1, dtype=torch.int64), 0, path=path)
        ref = ops.sample_from_logits_ref(logits.expand(S, nq), u[0])
        assert torch.equal(smp[0], ref), path


# ---------------------------------------------------------------------------------------------------
# the op's contract
# ---------------------------------------------------------------------------------------------------

@needs_cpp
def test_op_checks_arguments_and_schema():
    dec = _decoder("k3")
    w = pack_decoder(dec).weights
    B, S = 2, 5
    cw = 2 * 16 * len(w.dilations)
    args = lambda **kw: dict(dict(cond=torch.zeros(B, S, cw), u=torch.rand(B, S), forced=None,  # noqa: E731
                                  queues=torch.zeros(B, sum(w.queue_rows), w.n_res),
                                  x_prev=torch.zeros(B, dtype=torch.int64), t0=0), **kw)
    with pytest.raises(RuntimeError, match="cond must be"):
        ops.wavenet_generate(w, **args(cond=torch.zeros(B, S, cw + 1)))
    with pytest.raises(RuntimeError, match="queues must have shape"):
        ops.wavenet_generate(w, **args(queues=torch.zeros(B, 3, w.n_res)))
    with pytest.raises(RuntimeError, match="x_prev classes"):
        ops.wavenet_generate(w, **args(x_prev=torch.full((B,), 64, dtype=torch.int64)))
    with pytest.raises(RuntimeError, match="unknown path"):
        ops.wavenet_generate(w, **args(), path="sse9")
    a = args(forced=torch.randint(0, 64, (B, S)))
    torch.library.opcheck(torch.ops.wavenet_ae.wavenet_generate.default,
                          (w.embed, w.w_dil, w.w_out, w.b_out, w.w_post1, w.b_post1, w.w_post2, w.b_post2,
                           list(w.dilations), a["cond"], a["u"], a["forced"], a["queues"], a["x_prev"], 0, True,
                           "auto"),
                          test_utils=("test_schema", "test_faketensor"))


def test_queue_state_continues_across_engines():
    """The python and cpp engines share the queue layout: a chunk run by one continues the other's."""
    if not ops.has_kernel("wavenet_generate", "cpu"):
        pytest.skip("no kernels")
    dec = _decoder("tiny")
    w = pack_decoder(dec).weights
    B, S = 2, 300
    g0 = torch.Generator().manual_seed(0)
    cond = torch.randn(B, S, 2 * 32 * len(w.dilations), generator=g0)
    forced = torch.randint(0, 256, (B, S), generator=g0)
    u = torch.rand(B, S)
    outs = []
    for first in (ops.wavenet_generate_ref, ops.wavenet_generate):
        q, x = torch.zeros(B, sum(w.queue_rows), w.n_res), forced[:, 0].clone()
        first(w, cond[:, :200].contiguous(), u[:, :200].contiguous(), forced[:, :200].contiguous(), q, x, 0)
        _, lg = ops.wavenet_generate(w, cond[:, 200:].contiguous(), u[:, 200:].contiguous(),
                                     forced[:, 200:].contiguous(), q, x, 200, want_logits=True)
        outs.append(lg)
    assert _report("python-then-cpp vs cpp-then-cpp", outs[0], outs[1]) < LOGIT_TOL


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("geometry,B", [("tiny", 1), ("tiny", 16), ("paper_narrow", 3), ("k3", 4)])
def test_cuda_engine_teacher_forced_logits_equal_forward(geometry, B):
    dec = _decoder(geometry)
    R = dec.receptive_field
    dec_q, lc_steps, g, ref = _teacher_forced_case(dec, B, N=40)
    gen = Generator(dec, "cuda")
    smp, lg = gen.run(lc_steps, g, dec_q[:, 0], forced=dec_q[:, 1:], want_logits=True, chunk=300)
    assert torch.equal(smp.cpu(), dec_q[:, 1:])
    assert _report(f"cuda vs forward [{geometry}, B={B}]", lg[:, R - 1:].cpu(), ref) < LOGIT_TOL


@needs_cuda
@pytest.mark.parametrize("geometry,B", [("tiny", 1), ("tiny", 16), ("paper_narrow", 3)])
def test_cuda_engine_samples_like_python_engine(geometry, B):
    dec = _decoder(geometry)
    _compare_free_running(dec, Generator(dec, "cuda"), B, T=300)


@needs_cuda
@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_cuda_engine_low_precision_weights(dtype, rel):
    """fp16/bf16 weight matrices (fp32 accumulation): logits within rel * max|logit| of fp32 forward."""
    dec = _decoder("paper_narrow")
    R = dec.receptive_field
    dec_q, lc_steps, g, ref = _teacher_forced_case(dec, 2, N=40)
    gen = Generator(dec, "cuda", weight_dtype=dtype)
    _, lg = gen.run(lc_steps, g, dec_q[:, 0], forced=dec_q[:, 1:], want_logits=True)
    assert _report(f"cuda {dtype} vs forward", lg[:, R - 1:].cpu(), ref) < rel * ref.abs().max()


# ---------------------------------------------------------------------------------------------------
# run dir and CLIs
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path):
    """A hand-made run dir: tiny config, two speakers, two checkpoints (+ a stale temp file)."""
    cfg = preset("tiny")
    cfg.model.vq_warmup_steps = 0           # untrained weights, but quantising as a trained run does
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.json").write_text(cfg.to_json())
    (d / "speakers.json").write_text(json.dumps(["alice", "bob"]))
    from wavenet_ae import checkpoint
    torch.manual_seed(1)        # step 5: a plain torch.save dict
    torch.save({"model": WaveNetAE(cfg.model).state_dict(), "step": 5}, d / "checkpoints" / "step-00000005.pt")
    torch.manual_seed(2)        # step 10: written by the training loop's checkpoint module (header + sha256)
    checkpoint.save(d, 10, {"model": WaveNetAE(cfg.model).state_dict(), "step": 10}, keep=0)
    (d / "checkpoints" / "step-00000020.pt.tmp").write_bytes(b"partial")
    return d


@pytest.fixture
def wav_file(tmp_path):
    n = 3000
    t = np.arange(n) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 150 * t) * np.hanning(n)).astype(np.float32)
    p = tmp_path / "bob" / "in.wav"
    p.parent.mkdir()
    sf.write(p, wav, 16000)
    return p


def test_load_run_takes_the_latest_checkpoint(run_dir):
    from wavenet_ae.run_dir import load_run
    run = load_run(run_dir)
    assert run.step == 10 and run.checkpoint.name == "step-00000010.pt"
    torch.manual_seed(2)
    want = WaveNetAE(preset("tiny").model).state_dict()
    got = run.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not run.model.training
    assert run.speaker_id("bob") == 1


def test_load_run_falls_back_from_a_corrupt_checkpoint(run_dir):
    from wavenet_ae.run_dir import load_run
    p = run_dir / "checkpoints" / "step-00000010.pt"
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="checksum"):
        run = load_run(run_dir)
    assert run.step == 5


@pytest.mark.parametrize("engine", ["python", "cpp"])
def test_generate_cli_writes_a_wav_at_the_model_rate(run_dir, wav_file, tmp_path, engine):
    if engine == "cpp" and not ops.has_kernel("wavenet_generate", "cpu"):
        pytest.skip("no kernels")
    out = tmp_path / "out" / f"{engine}.wav"
    assert generate_main(["--run-dir", str(run_dir), "--input", str(wav_file), "--out", str(out),
                          "--engine", engine, "--speaker", "alice", "--no-progress"]) == 0
    y, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and y.shape == (3000,)
    assert np.isfinite(y).all() and np.abs(y).max() <= 1.0 and np.abs(y).max() > 0


@needs_cpp
@pytest.mark.parametrize("weights", ["auto", "fp16", "bf16"])
def test_generate_cli_weights(run_dir, wav_file, tmp_path, capsys, weights):
    out = tmp_path / f"{weights}.wav"
    assert generate_main(["--run-dir", str(run_dir), "--input", str(wav_file), "--out", str(out),
                          "--engine", "cpp", "--weights", weights, "--no-progress"]) == 0
    want = {"fp16": "float16", "bf16": "bfloat16"}.get(weights, "float16" if ops.wavenet_generate_cpu_path() == "avx2"
                                                      else "float32")
    assert f"{want} weights" in capsys.readouterr().err
    y, _ = sf.read(out, dtype="float32")
    assert y.shape == (3000,) and np.isfinite(y).all()
    # the python engine is the float32 reference: reduced weights are refused in one line
    with pytest.raises(SystemExit) as e:
        generate_main(["--run-dir", str(run_dir), "--input", str(wav_file), "--out", str(out),
                       "--engine", "python", "--weights", "fp16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "python engine" in err and len(err.splitlines()) == 1


def test_generate_cli_errors_are_clear(run_dir, wav_file, tmp_path, capsys):
    base = ["--run-dir", str(run_dir), "--out", str(tmp_path / "o.wav"), "--no-progress", "--engine", "python"]
    with pytest.raises(SystemExit) as e:
        generate_main(base + ["--input", str(wav_file), "--speaker", "carol"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown speaker 'carol'" in err and "alice, bob" in err

    bad = tmp_path / "broken.wav"
    bad.write_text("not audio")
    with pytest.raises(SystemExit) as e:
        generate_main(base + ["--input", str(bad)])
    assert e.value.code == 2 and str(bad) in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        generate_main(base + ["--input", str(tmp_path / "missing.wav")])
    assert e.value.code == 2 and "missing.wav" in capsys.readouterr().err

    for p in (run_dir / "checkpoints").glob("step-*.pt"):
        p.unlink()
    with pytest.raises(SystemExit) as e:
        generate_main(base + ["--input", str(wav_file)])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_encode_cli_writes_latents_and_codes(run_dir, wav_file, tmp_path):
    from wavenet_ae.encode import main as encode_main
    out = tmp_path / "lat.npy"
    assert encode_main(["--run-dir", str(run_dir), "--input", str(wav_file), "--out", str(out)]) == 0
    z = np.load(out)
    m = preset("tiny").model
    assert z.shape == (int(np.ceil(3000 / m.hop)), m.n_latent) and z.dtype == np.float32
    codes = np.load(tmp_path / "lat.codes.npy")
    assert codes.shape == (z.shape[0],) and codes.min() >= 0 and codes.max() < m.n_codes
    from wavenet_ae.run_dir import load_run
    cb = load_run(run_dir).model.bottleneck.codebook.numpy()
    assert np.allclose(z, cb[codes], atol=1e-6)      # VQ-VAE latents are the chosen code vectors


def test_clis_run_as_modules(run_dir, wav_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "m.wav"
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.generate", "--run-dir", str(run_dir), "--input",
                        str(wav_file), "--out", str(out), "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "speaker 'bob'" in r.stderr          # inferred from the input's folder
    assert sf.info(out).frames == 3000
    r = subprocess.run([sys.executable, "-m", "wavenet_ae.encode", "--run-dir", str(run_dir), "--input",
                        str(wav_file), "--out", str(tmp_path / "z.npy")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


@needs_cpp
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("geometry,wname", [("tiny", "fp32"), ("paper_narrow", "fp32"), ("tiny", "fp16"),
                                            ("k3", "bf16")])
def test_cpp_engine_batch_one_team_of_threads_samples_like_python_engine(geometry, wname, threads):
    """Batch 1 on several threads splits every layer's products across them (a team with a barrier
    per layer; uneven splits with 3). Sums are grouped by thread, so the check is the free-running one:
    identical samples until a near-tie, logits within the fp32 tolerance (of the rounded model for
    reduced weights: the python engine gets the same rounded matrices)."""
    dec = _decoder(geometry)
    if wname != "fp32":
        from test_generate_precision import REDUCED, _rounded
        dec = _rounded(dec, REDUCED[wname])
    gen = Generator(dec, "cpp", weight_dtype=wname)
    torch.set_num_threads(threads)
    q, _ = _compare_free_running(dec, gen, 1, T=300)
    g0 = torch.Generator().manual_seed(3)                  # _compare_free_running's inputs, without logits:
    R, m_lc, m_g = dec.receptive_field, dec.layers[0].lc_proj.in_channels, dec.layers[0].gc_proj.in_features
    lc, g = torch.randn(1, m_lc, R + 300, generator=g0), torch.randn(1, m_g, generator=g0)
    assert torch.equal(gen.generate(lc, g, u=torch.rand(1, 300, generator=g0), chunk=173), q)  # history skips outputs
    # teacher forcing with logits, through several chunks (the team starts once per engine call)
    dec_q, lc_steps, g, ref = _teacher_forced_case(dec, 1, N=40)
    smp, lg = gen.run(lc_steps, g, dec_q[:, 0], forced=dec_q[:, 1:], want_logits=True, chunk=211)
    assert torch.equal(smp, dec_q[:, 1:])
    assert _report(f"cpp team of {threads} vs forward [{geometry}, {wname}]", lg[:, dec.receptive_field - 1:],
                   ref) < LOGIT_TOL
