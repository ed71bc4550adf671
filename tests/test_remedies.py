"""The remedies of issue #20, each checked to do what it claims: sliding-window CMVN of the encoder
input, noise on the decoder's autoregressive input, the speaker adversary (gradient reversal), the
speaker embedding in the local conditioning, and the probes tracked at validation; plus a real
training run with all of them on, whose run directory loads for inference."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wavenet_ae.config import ModelConfig, preset
from wavenet_ae.data import DEMO_CORPUS
from wavenet_ae.data.corpus import Utterance, load_audio
from wavenet_ae.diagnostics import ProbeTracker, held_out_diagnostics
from wavenet_ae.evaluate.probes import linear_probe, utterance_frames
from wavenet_ae.model import WaveNetAE
from wavenet_ae.model.decoder import corrupt_inputs
from wavenet_ae.model.encoder import CMVN_VAR_FLOOR, sliding_cmvn
from wavenet_ae.rfield import chain_range, encoder_layers

NARROW = dict(n_enc=12, n_enc_fc=2, n_latent=6, n_lc_out=8, n_global_embed=4, n_res=6, n_dil=6,
              n_skp=8, n_post=8, n_quant=16, n_blocks=1, n_block_layers=4, bottleneck="ae")


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**preset("tiny").model.__dict__, **kw})


# --- CMVN ------------------------------------------------------------------------------------------

def test_sliding_cmvn_matches_the_windowed_statistics_and_ignores_a_per_utterance_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 40, generator=g, dtype=torch.float64) * 3 + 7
    w = 9
    y = sliding_cmvn(x, w)
    assert y.shape == (2, 5, 40 - w + 1)
    xs = x.numpy()
    for t in (0, 7, 31):
        win = xs[..., t: t + w]
        want = (xs[..., t + w // 2] - win.mean(-1)) / np.sqrt(win.var(-1) + CMVN_VAR_FLOOR)
        np.testing.assert_allclose(y[..., t].numpy(), want, rtol=1e-9, atol=1e-9)
    # a constant offset per utterance and coefficient (a channel, a speaker's mean) leaves it unchanged
    shifted = sliding_cmvn(x + torch.randn(2, 5, 1, generator=g, dtype=torch.float64) * 10, w)
    torch.testing.assert_close(shifted, y, rtol=1e-9, atol=1e-9)
    # on a stationary signal the output is ~zero-mean and ~unit-variance per coefficient
    z = sliding_cmvn(torch.randn(1, 3, 4000, generator=g, dtype=torch.float64) * 5 + 2, 101)
    assert z.mean().abs() < 0.05 and abs(z.std().item() - 1) < 0.05


def test_cmvn_widens_the_encoder_field_as_the_algebra_says():
    """Latent m reads exactly the frames rfield.encoder_layers gives (cmvn layer included), so windows
    cut by the slice buffer equal the whole file's features cut to them."""
    m = _tiny(**NARROW, cmvn_frames=11, jitter_prob=0.0)
    assert encoder_layers(m)[0].name == "cmvn" and encoder_layers(m)[0].kernel == 11
    model = WaveNetAE(m).double().eval()
    p = model.plan(3 * m.hop)
    feats = torch.randn(1, m.n_in, p.n_frames, dtype=torch.float64, requires_grad=True)
    z, _ = model.encode(feats)
    assert z.shape[-1] == p.n_latents
    for j in range(p.n_latents):
        feats.grad = None
        z[0, :, j].sum().backward(retain_graph=True)
        idx = torch.nonzero(feats.grad[0].abs().sum(0)).flatten()
        assert (int(idx.min()), int(idx.max())) == chain_range(encoder_layers(m), j, j)
    # the window's latents are the longer signal's latents cut to it
    longer = torch.randn(1, m.n_in, p.n_frames + 4 * m.enc_stride, dtype=torch.float64)
    longer[..., 2 * m.enc_stride: 2 * m.enc_stride + p.n_frames] = feats.detach()
    torch.testing.assert_close(model.encode(longer)[0][..., 2: 2 + p.n_latents], z.detach())


# --- decoder input noise ---------------------------------------------------------------------------

def test_corrupt_inputs_replaces_the_expected_share():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (4, 50_000))
    y = corrupt_inputs(x, 0.3, 256)
    changed = (y != x).float().mean().item()
    # replaced with probability 0.3, by the same class with probability 1/256
    assert abs(changed - 0.3 * 255 / 256) < 0.01
    assert y.dtype == x.dtype and int(y.min()) >= 0 and int(y.max()) <= 255
    assert torch.equal(corrupt_inputs(x, 0.0, 256), x)


def test_decoder_input_noise_in_training_only():
    torch.manual_seed(0)
    clean = WaveNetAE(_tiny(**NARROW, jitter_prob=0.0))
    noisy = WaveNetAE(_tiny(**NARROW, jitter_prob=0.0, dec_input_noise=0.5))
    noisy.load_state_dict(clean.state_dict())        # the option adds no parameters
    m, p = clean.cfg, clean.plan(2 * clean.cfg.hop)
    feats, dec_q = torch.randn(2, m.n_in, p.n_frames), torch.randint(0, m.n_quant, (2, p.dec_len))
    spk = torch.tensor([0, 1])
    for model in (clean, noisy):
        model.eval()
    torch.testing.assert_close(noisy(feats, dec_q, spk)[0], clean(feats, dec_q, spk)[0], rtol=0, atol=0)
    clean.train()
    noisy.train()
    assert not torch.allclose(noisy(feats, dec_q, spk)[0], clean(feats, dec_q, spk)[0])


# --- speaker adversary -----------------------------------------------------------------------------

def test_gradient_reversal_flips_the_encoder_gradient_and_trains_the_classifier_normally():
    torch.manual_seed(0)
    weight = 0.7
    model = WaveNetAE(_tiny(**NARROW, adv_weight=weight, n_speakers=3)).double().train()
    p = model.plan(2 * model.cfg.hop)
    feats = torch.randn(3, model.cfg.n_in, p.n_frames, dtype=torch.float64)
    spk = torch.tensor([0, 1, 2])

    def grads(loss_fn):
        model.zero_grad()
        z, _ = model.encode(feats)
        loss_fn(z).backward()
        return ({n: q.grad.clone() for n, q in model.encoder.named_parameters()},
                {n: q.grad.clone() for n, q in model.adversary.named_parameters()})

    enc_rev, clf_rev = grads(lambda z: model.adversary(z, spk)["loss_adv"])
    plain = lambda z: F.cross_entropy(model.adversary.logits(z), spk[:, None].expand(-1, z.shape[-1]))
    enc_plain, clf_plain = grads(plain)
    for n in enc_plain:
        torch.testing.assert_close(enc_rev[n], -weight * enc_plain[n])
    for n in clf_plain:
        torch.testing.assert_close(clf_rev[n], clf_plain[n])
    assert any(g.abs().sum() > 0 for g in enc_plain.values())


def test_adversary_cannot_be_defeated_by_scaling_the_latents():
    torch.manual_seed(0)
    model = WaveNetAE(_tiny(**NARROW, adv_weight=0.1, n_speakers=3)).double()
    z = torch.randn(2, 6, 9, dtype=torch.float64)
    torch.testing.assert_close(model.adversary.logits(1000 * z), model.adversary.logits(z), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model.adversary.logits(z.roll(1, 1)), model.adversary.logits(z))


def test_adversary_terms_in_training_and_accuracy_at_validation():
    torch.manual_seed(0)
    model = WaveNetAE(_tiny(**NARROW, adv_weight=0.5, n_speakers=4))
    p = model.plan(2 * model.cfg.hop)
    feats, dec_q = torch.randn(4, model.cfg.n_in, p.n_frames), torch.randint(0, 16, (4, p.dec_len))
    spk = torch.arange(4)
    model.train()
    _, terms = model.loss(feats, dec_q, spk)
    assert {"loss_adv", "adv_accuracy", "adv_ce"} <= set(terms)
    assert 0 <= float(terms["adv_accuracy"]) <= 1
    # a classifier that names every frame's speaker scores 1 at validation
    with torch.no_grad():
        last = model.adversary.net[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0, 0, 0, 0]))

    class B:                       # a slice-buffer batch with given features, every window speaker 0
        speaker = torch.zeros(4, dtype=torch.long)

        def to(self, device):
            return feats, dec_q, self.speaker
    assert held_out_diagnostics(model, [B()])["adv_accuracy"] == 1.0
    model.eval()
    assert "loss_adv" not in model.loss(feats, dec_q, spk)[1]       # inference never runs the head


# --- speaker in the local conditioning -------------------------------------------------------------

@pytest.mark.parametrize("on", [False, True])
def test_speaker_in_lc_makes_the_signal_conditioning_speaker_dependent(on):
    torch.manual_seed(0)
    model = WaveNetAE(_tiny(**NARROW, speaker_in_lc=on)).eval()
    assert model.conditioning.conv.in_channels == 6 + (4 if on else 0)
    wav = (0.1 * np.random.default_rng(0).standard_normal(3000)).astype(np.float32)
    lc0, z0, _ = model.signal_conditioning(wav, torch.tensor(0))
    lc1, z1, _ = model.signal_conditioning(wav, torch.tensor(1))
    torch.testing.assert_close(z0, z1)
    assert torch.equal(lc0, lc1) != on


def test_defaults_leave_the_model_unchanged():
    m = preset("tiny").model
    assert (m.cmvn_frames, m.dec_input_noise, m.adv_weight, m.speaker_in_lc) == (0, 0.0, 0.0, False)
    model = WaveNetAE(m)
    assert model.adversary is None and not any(k.startswith("adversary") for k in model.state_dict())
    assert encoder_layers(m)[0].name == "conv_in"


# --- probes at validation --------------------------------------------------------------------------

def test_probe_tracker_scores_as_the_evaluation_does():
    """The tracker's probes equal evaluate's linear_probe on evaluate's frames of the same files."""
    files = sorted(p for p in DEMO_CORPUS.rglob("*.flac"))
    by_spk: dict[str, list] = {}
    for f in files:
        by_spk.setdefault(f.parent.name, []).append(f)
    spks = sorted(by_spk)[:3]
    fit = [Utterance(str(f), s, 0) for s in spks for f in by_spk[s][:2]]
    score = [Utterance(str(by_spk[s][2]), s, 0) for s in spks]
    cfg = _tiny(n_speakers=3)
    torch.manual_seed(0)
    model = WaveNetAE(cfg).train()
    tracker = ProbeTracker(fit, score, cfg)
    got = tracker(model)
    assert model.training                              # restored after encoding in evaluation mode
    frames = {k: [utterance_frames(model, load_audio(u.path, cfg.sample_rate), u.path, u.speaker)
                  for u in us] for k, us in (("fit", fit), ("score", score))}
    for target in ("phone", "speaker"):
        for name, k in (("latents", 0), ("mfcc", 1)):
            want = linear_probe([f[k] for f in frames["fit"]], [f[k] for f in frames["score"]], target)
            assert got[f"probe_{target}_{name}"] == pytest.approx(want, abs=1e-12), (target, name)
    assert got["probe_seconds"] > 0


# --- a real run with every remedy on ---------------------------------------------------------------

ALL_REMEDIES = ["cmvn_frames=21", "dec_input_noise=0.2", "adv_weight=0.3", "speaker_in_lc=true",
                "jitter_prob=0.5", "n_codes=16", "vq_warmup_steps=0"]


def _corpus_with_split(synth_corpus):
    corpus = synth_corpus(n_speakers=3, per_speaker=4, seconds=(1.6, 2.0))
    # a fixed split (else a hash of the temporary paths decides, and may leave no validation file)
    rows = [f"spk{s}/u{u}.wav\tspk{s}\t{'valid' if u == 0 else 'train'}" for s in range(3) for u in range(4)]
    (corpus / "split.tsv").write_text("\n".join(["path\tspeaker\tsplit", *rows]) + "\n")
    return corpus


def _train(run, corpus, steps, *sets):
    cmd = [sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run), "--data", str(corpus),
           "--preset", "tiny", "--max-steps", str(steps), "--device", "cpu", "--set", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_resume_with_all_remedies_is_exact(synth_corpus, tmp_path):
    """Their random draws (input noise, jitter) come from the checkpointed RNG, the adversary's weights
    and optimizer state from the checkpoint: 2 + 2 steps give the weights of 4 straight."""
    from wavenet_ae import checkpoint
    corpus = _corpus_with_split(synth_corpus)
    _train(tmp_path / "straight", corpus, 4, "log_every=1", *ALL_REMEDIES)
    _train(tmp_path / "resumed", corpus, 2, "log_every=1", *ALL_REMEDIES)
    _train(tmp_path / "resumed", corpus, 4, "log_every=1", *ALL_REMEDIES)
    a, b = checkpoint.load_latest(tmp_path / "straight"), checkpoint.load_latest(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4 and "adversary.net.0.weight" in a["model"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_training_with_all_remedies_logs_them_and_loads(synth_corpus, tmp_path):
    from wavenet_ae import checkpoint
    from wavenet_ae.run_dir import load_run
    corpus = _corpus_with_split(synth_corpus)
    run = tmp_path / "run"
    r = _train(run, corpus, 4, "validate_every=2", "probe_files=6", *ALL_REMEDIES)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    valid = [x for x in records if x.get("kind") == "valid"]
    assert [x["step"] for x in valid] == [2, 4], r.stdout + r.stderr[-3000:]
    for x in valid:
        assert 0 <= x["adv_accuracy"] <= 1 and 0 <= x["probe_speaker_latents"] <= 1
        assert x["probe_phone_latents"] is None            # no alignments in this corpus: null
        assert x["valid_seconds"] >= x["probe_seconds"] > 0
    assert all("adv_accuracy" in x for x in records if x.get("kind") == "train")
    loaded = load_run(run)
    ck = checkpoint.load_latest(run)
    assert loaded.model.adversary is not None
    torch.testing.assert_close(loaded.model.adversary.net[0].weight, ck["model"]["adversary.net.0.weight"])
    assert loaded.model.cfg.cmvn_frames == 21 and loaded.model.conditioning.speaker_in_lc
