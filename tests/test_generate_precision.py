"""Reduced-precision weights in the generation engines (fp16, bf16): exactness of the arithmetic, and the
quality bound against the float32 engine on a (briefly) trained demo model.

What is exact and what is bounded:
* The cpp engine with fp16/bf16 weight matrices computes, in float32, the model whose four engine
  matrices (dilated convs, residual/skip, post1, post2) are rounded to that dtype: its teacher-forced
  logits equal `WaveNet.forward` of that rounded model within the fp32 tolerance LOGIT_TOL, on both CPU
  paths (`generic`: portable c10::Half / c10::BFloat16 conversions, the emulation that runs everywhere;
  `avx2`: F16C / shift widening). So the only error is the rounding of the weights.
* That error, bounded on the trained model (teacher-forced logits vs the float32 engine), as a fraction
  of the logits' range: fp16 REL_TOL['fp16'], bf16 REL_TOL['bf16'] (max abs difference / max |logit|).
* Given the same uniforms, along the float32 engine's own 10k-step trajectory, the class each dtype
  draws at each step equals the float32 draw at >= 99% of the steps (a free-running comparison would
  measure chaos, not precision: one different draw changes every later state).
* Resynthesis of a demo utterance: mel-cepstral distortion within MCD_TOL_DB of the float32 engine's,
  on the mean of paired draws, up to its sampling error (see the test).
"""
import numpy as np
import pytest
import soundfile as sf
import torch

from test_generate import LOGIT_TOL, _cpu_paths, _decoder, _report, _teacher_forced_case
from wavenet_ae import ops
from wavenet_ae.config import preset
from wavenet_ae.data import DEMO_CORPUS
from wavenet_ae.data.windows import cut_window, valid_starts
from wavenet_ae.generate import Generator, resolve_weight_dtype
from wavenet_ae.model import WaveNetAE

REDUCED = {"fp16": torch.float16, "bf16": torch.bfloat16}
REL_TOL = {"fp16": 5e-4, "bf16": 4e-3}     # max |logits - logits_fp32| / max |logits_fp32| (measured 1.1e-4, 9.5e-4)
SAME_DRAWS = 0.99
MCD_TOL_DB = 0.1

needs_cpp = pytest.mark.skipif(not ops.has_kernel("wavenet_generate", "cpu"),
                               reason="wavenet_ae._C without generation kernels (rebuild the extension)")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rounded(dec, dtype):
    """A copy of the decoder whose engine matrices are rounded to `dtype` (and held in float32)."""
    import copy
    r = copy.deepcopy(dec)
    with torch.no_grad():
        mods = [m for layer in r.layers for m in (layer.dil_conv, layer.res, layer.skip) if m is not None]
        for m in mods + [r.post1, r.post2]:
            m.weight.copy_(m.weight.to(dtype).float())
    return r


# ---------------------------------------------------------------------------------------------------
# exactness: reduced weights = the rounded model in float32
# ---------------------------------------------------------------------------------------------------

@needs_cpp
@pytest.mark.parametrize("path", _cpu_paths())
@pytest.mark.parametrize("wname", sorted(REDUCED))
@pytest.mark.parametrize("geometry,B", [("tiny", 1), ("tiny", 5), ("paper_narrow", 3), ("k3", 2)])
def test_reduced_weights_are_the_rounded_model_in_float32(geometry, B, wname, path):
    dec = _decoder(geometry)
    R = dec.receptive_field
    dec_q, lc_steps, g, _ = _teacher_forced_case(dec, B, N=40)
    with torch.no_grad():
        ref = _rounded(dec, REDUCED[wname])(dec_q[:, :-1], lc_steps[:, :, (dec.layers[0].dil_conv.kernel_size[0] - 1)
                                                                        * dec.layers[0].dilation:], g).transpose(1, 2)
    gen = Generator(dec, "cpp", weight_dtype=REDUCED[wname], cpu_path=path)
    assert gen.packed.weights.w_dil.dtype == REDUCED[wname]
    smp, lg = gen.run(lc_steps, g, dec_q[:, 0], forced=dec_q[:, 1:], want_logits=True, chunk=300)
    assert torch.equal(smp, dec_q[:, 1:])
    assert _report(f"cpp/{path} {wname} vs rounded forward [{geometry}, B={B}]", lg[:, R - 1:], ref) < LOGIT_TOL


# ---------------------------------------------------------------------------------------------------
# the quality bound on a trained demo model
# ---------------------------------------------------------------------------------------------------

def _demo_wavs():
    files = sorted(DEMO_CORPUS.glob("*/*.flac"))
    assert files, f"no demo corpus under {DEMO_CORPUS}"
    speakers = sorted({f.parent.name for f in files})
    return [(sf.read(f, dtype="float32")[0], speakers.index(f.parent.name)) for f in files]


@pytest.fixture(scope="module")
def trained():
    """The tiny autoencoder trained for a few dozen steps on the demo corpus (peaked, input-dependent
    output distributions, unlike a random decoder's), and one held-back utterance."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.model.bottleneck = "ae"
    m = cfg.model
    model = WaveNetAE(m).train()
    p = model.plan(cfg.data.n_win)
    wavs = _demo_wavs()
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(6):
        feats, decs, spks = [], [], []
        for _ in range(cfg.data.n_batch):
            wav, spk = wavs[rng.integers(1, len(wavs))]
            starts = valid_starts(len(wav), p)
            f, d = cut_window(wav, int(rng.integers(starts.start, starts.stop)), p, m)
            feats.append(f), decs.append(d), spks.append(spk)
        batches.append((torch.from_numpy(np.stack(feats)), ops.mu_law_encode(torch.from_numpy(np.stack(decs)),
                                                                             m.n_quant), torch.tensor(spks)))
    feats = torch.cat([b[0] for b in batches])
    model.encoder.set_feature_stats(feats.mean((0, 2)), feats.std((0, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        loss, _ = model.loss(*batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, wavs[0]


@needs_cpp
@pytest.mark.parametrize("wname", sorted(REDUCED))
def test_reduced_weights_meet_the_quality_bound_on_a_trained_model(trained, wname):
    """Logits within REL_TOL of the float32 engine's, and >= 99% of 10k draws identical."""
    model, (wav, spk) = trained
    T = 10_000
    lc, _, g = model.signal_conditioning(wav[:T], torch.tensor(spk))
    u = torch.rand(1, T, generator=torch.Generator().manual_seed(4))
    ref_gen = Generator(model.decoder, "cpp")
    q32, lg32 = ref_gen.generate(lc, g, u=u, want_logits=True)
    assert len(torch.unique(q32)) > 20                     # a varied trajectory, not silence
    gen = Generator(model.decoder, "cpp", weight_dtype=REDUCED[wname])
    # the dtype's logits along the float32 trajectory: history and the float32 samples teacher-forced
    R = gen.receptive_field
    hist = torch.full((1, R), gen.silence_class(), dtype=torch.int64)
    seq = torch.cat([hist, q32], 1)
    _, lg = gen.run(lc[:, :, 1:], g, seq[:, 0], forced=seq[:, 1:], want_logits=True)
    lg = lg[:, R - 1:]
    err = _report(f"cpp {wname} vs cpp float32, trained tiny, {T} steps", lg, lg32)
    assert err < REL_TOL[wname] * lg32.abs().max()
    same = (ops.sample_from_logits_ref(lg, u) == ops.sample_from_logits_ref(lg32, u)).float().mean().item()
    free = (gen.generate(lc, g, u=u) == q32).float().mean().item()
    print(f"{wname}: identical draws along the float32 trajectory {100 * same:.2f}% of {T}; "
          f"free-running identical samples {100 * free:.2f}%")
    assert same >= SAME_DRAWS


@needs_cpp
def test_reduced_weights_resynthesis_mcd_is_that_of_float32(trained):
    """Resynthesis MCD of each dtype vs float32, paired draws (the same uniforms for every dtype).

    A resynthesis is a random draw: its MCD varies from draw to draw by ~1 dB (std of one 1 s draw; the
    trained demo run of /work/runs measures the same), far more than the 0.1 dB bound, and trajectories
    that differ at one draw differ from then on. So the bound is on the mean over N paired draws and is
    asserted up to the sampling error of that mean: |mean(MCD_dtype - MCD_fp32)| < 0.1 dB + 3 se."""
    from wavenet_ae.evaluate import mel_cepstral_distortion
    model, (wav, spk) = trained
    nz = np.flatnonzero(np.abs(wav) > 0.01)
    seg = wav[nz[0]: nz[0] + 8000]                                   # 0.5 s of speech
    sr = model.cfg.sample_rate
    lc, _, g = model.signal_conditioning(seg, torch.tensor(spk))
    N = 32
    u = torch.rand(N, len(seg), generator=torch.Generator().manual_seed(0))
    mcd = {}
    for name in ("fp32", *sorted(REDUCED)):
        q = Generator(model.decoder, "cpp", weight_dtype=name).generate(lc.expand(N, -1, -1), g.expand(N, -1), u=u)
        y = ops.mu_law_decode(q, model.cfg.n_quant).numpy()
        mcd[name] = np.array([mel_cepstral_distortion(seg, y[i], sr) for i in range(N)])
    for name in sorted(REDUCED):
        d = mcd[name] - mcd["fp32"]
        se = d.std(ddof=1) / np.sqrt(N)
        print(f"resynthesis MCD over {N} draws: fp32 {mcd['fp32'].mean():.3f} dB (std of a draw "
              f"{mcd['fp32'].std():.2f}), {name} {mcd[name].mean():.3f} dB: difference {d.mean():+.3f} +- {se:.3f} dB")
        assert abs(d.mean()) < MCD_TOL_DB + 3 * se, name
        assert se < 0.3                                          # the comparison is not all noise


# ---------------------------------------------------------------------------------------------------
# choosing the dtype
# ---------------------------------------------------------------------------------------------------

def test_weight_dtype_auto_is_a_fixed_rule():
    assert resolve_weight_dtype("auto", "python") == torch.float32
    assert resolve_weight_dtype("fp16", "cpp") == torch.float16
    assert resolve_weight_dtype(torch.bfloat16, "cpp") == torch.bfloat16
    if ops.has_kernel("wavenet_generate", "cpu"):
        want = torch.float16 if ops.wavenet_generate_cpu_path("auto") == "avx2" else torch.float32
        assert resolve_weight_dtype("auto", "cpp") == want
    with pytest.raises(ValueError, match="unknown weight dtype"):
        resolve_weight_dtype("fp8", "cpp")


def test_python_engine_refuses_reduced_weights_in_one_line():
    dec = _decoder("k3")
    with pytest.raises(ValueError) as e:
        Generator(dec, "python", weight_dtype="fp16")
    assert "python engine" in str(e.value) and "\n" not in str(e.value)
    assert Generator(dec, "python", weight_dtype="auto").packed.weights.w_dil.dtype == torch.float32

