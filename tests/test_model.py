"""Model: bottlenecks (forward, backward, known cases) and learning on the demo corpus."""
import numpy as np
import pytest
import soundfile as sf
import torch

from wavenet_ae.config import ModelConfig, preset
from wavenet_ae.data import DEMO_CORPUS
from wavenet_ae.data.windows import cut_window, valid_starts
from wavenet_ae.model import WaveNetAE
from wavenet_ae.model.bottleneck import VAEBottleneck, VQBottleneck
from wavenet_ae.model.decoder import jitter
from wavenet_ae.ops import mu_law_encode


def _tiny(bottleneck, vq_warmup_steps=0):
    cfg = preset("tiny")
    cfg.model.bottleneck = bottleneck
    cfg.model.vq_warmup_steps = vq_warmup_steps
    return cfg


def _random_batch(model, n_win, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = model.plan(n_win)
    m = model.cfg
    return (torch.randn(B, m.n_in, p.n_frames, generator=g),
            torch.randint(0, m.n_quant, (B, p.dec_len), generator=g),
            torch.randint(0, m.n_speakers, (B,), generator=g))


@pytest.mark.parametrize("bottleneck", ["ae", "vae", "vqvae"])
def test_forward_backward_shapes_and_gradients(bottleneck):
    torch.manual_seed(0)
    cfg = _tiny(bottleneck)
    model = WaveNetAE(cfg.model).train()
    feats, dec_q, spk = _random_batch(model, cfg.data.n_win)
    logits, _ = model(feats, dec_q, spk)
    assert logits.shape == (2, cfg.model.n_quant, cfg.data.n_win)
    loss, terms = model.loss(feats, dec_q, spk)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"parameters without gradient: {no_grad}"
    assert abs(terms["ce"].item() - np.log(cfg.model.n_quant)) < 0.5   # untrained ~ uniform
    if bottleneck == "vae":
        assert terms["loss_kl"] > 0 and terms["kl_per_dim"].shape == (cfg.model.n_latent,)
    if bottleneck == "vqvae":
        assert terms["loss_commit"] > 0 and 1 <= terms["perplexity"] <= cfg.model.n_codes


def test_wrong_feature_length_is_a_clear_error():
    cfg = _tiny("ae")
    model = WaveNetAE(cfg.model)
    feats, dec_q, spk = _random_batch(model, cfg.data.n_win)
    with pytest.raises(ValueError, match="frames"):
        model(feats[..., 1:], dec_q, spk)


def test_vae_kl_is_zero_at_the_prior_and_positive_elsewhere():
    m = ModelConfig(n_enc=8, n_latent=4, bottleneck="vae")
    bn = VAEBottleneck(m).train()
    torch.nn.init.zeros_(bn.proj.weight)
    torch.nn.init.zeros_(bn.proj.bias)
    z, t = bn(torch.randn(3, 8, 5))
    assert t["loss_kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert z.std() > 0.5                       # sampled from N(0, 1) in training
    bn.eval()
    z, _ = bn(torch.randn(3, 8, 5))
    assert torch.all(z == 0)                   # the mean at evaluation
    torch.nn.init.constant_(bn.proj.bias, 1.0)
    _, t = bn(torch.randn(3, 8, 5))
    assert t["loss_kl"] > 0 and t["active_dims"] == 4


def test_vae_free_bits_leave_small_kl_unpenalised():
    torch.manual_seed(0)
    m = ModelConfig(n_enc=8, n_latent=4, bottleneck="vae", vae_free_bits=0.5)
    bn = VAEBottleneck(m).eval()
    with torch.no_grad():
        bn.proj.weight.zero_()
        bn.proj.bias.zero_()
        bn.proj.bias[0] = 2.0                  # dim 0: mu = 2, KL 2 nats per frame; dims 1-3: KL 0
    h = torch.randn(2, 8, 6, requires_grad=True)
    _, t = bn(h)
    # KL per dim [2, 0, 0, 0] -> penalised [2, .5, .5, .5] nats per frame, per wav sample / hop
    assert t["loss_kl"].item() == pytest.approx((2.0 + 3 * 0.5) / m.hop, rel=1e-5)
    assert t["kl_per_sample"].item() == pytest.approx(2.0 / m.hop, rel=1e-5)
    t["loss_kl"].backward()
    g = bn.proj.bias.grad
    assert g[0] > 0 and torch.all(g[1:4] == 0)   # only the dimension above its free bits is pulled


def test_vq_picks_nearest_code_and_passes_gradient_straight_through():
    torch.manual_seed(0)
    m = ModelConfig(n_enc=8, n_latent=4, n_codes=16, bottleneck="vqvae")
    bn = VQBottleneck(m).eval()
    h = torch.randn(2, 8, 7, requires_grad=True)
    z_q, t = bn(h)
    z_e = bn.proj(h)
    d = torch.cdist(z_e.transpose(1, 2).reshape(-1, 4), bn.codebook)
    assert torch.equal(t["codes"].flatten(), d.argmin(1))
    assert torch.allclose(z_q, bn.codebook[t["codes"]].transpose(1, 2), atol=1e-6)
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    g_st = h.grad.clone()
    h.grad = None
    (bn.proj(h) * w).sum().backward()
    assert torch.allclose(g_st, h.grad)


def test_collapsed_codebook_has_perplexity_one():
    m = ModelConfig(n_enc=8, n_latent=4, n_codes=16, bottleneck="vqvae", vq_dead_restart=False)
    bn = VQBottleneck(m).eval()
    bn.codebook.zero_()
    bn.codebook[3] = 100.0                     # one code far away, all others identical
    _, t = bn(torch.randn(4, 8, 9))
    assert t["perplexity"].item() == pytest.approx(1.0)
    assert t["codes_used"] == 1


def test_vq_ema_moves_codes_to_their_cluster_means_and_restarts_dead_codes():
    torch.manual_seed(0)
    m = ModelConfig(n_enc=4, n_latent=4, n_codes=8, bottleneck="vqvae", vq_ema_decay=0.5)
    bn = VQBottleneck(m).train()
    with torch.no_grad():
        bn.proj.weight.copy_(torch.eye(4)[:, :, None])
        bn.proj.bias.zero_()
    h = torch.randn(2, 4, 50) + 5.0            # all far from the initial codebook (~0)
    bn.initialized.fill_(True)                 # test the EMA alone, not the data-dependent init
    _, t = bn(h)
    used = int(t["codes"].flatten()[0])
    # one step of EMA with decay 0.5 from count 1: the used code moves half way to its cluster mean
    assert bn.codebook[used].mean() > 1.0
    for _ in range(30):
        _, t = bn(h)
    assert t["codes_used"] > 1                 # dead codes were restarted onto encoder outputs
    flat = h.transpose(1, 2).reshape(-1, 4)
    assert torch.cdist(bn.codebook, flat).min(1).values.max() < 3.0


def test_vq_codebook_starts_from_encoder_outputs():
    torch.manual_seed(0)
    m = ModelConfig(n_enc=4, n_latent=4, n_codes=8, bottleneck="vqvae")
    bn = VQBottleneck(m).train()
    h = torch.randn(2, 4, 50) * 3 + 5.0
    _, t = bn(h)
    assert bool(bn.initialized)
    z_e = bn.proj(h).detach().transpose(1, 2).reshape(-1, 4)
    assert torch.cdist(bn.codebook, z_e).min(1).values.max() < 0.5
    assert t["codes_used"] > 4


def test_vq_warmup_trains_unquantised_then_starts_the_codebook_from_encoder_outputs():
    torch.manual_seed(0)
    m = ModelConfig(n_enc=4, n_latent=4, n_codes=8, bottleneck="vqvae", vq_warmup_steps=3)
    bn = VQBottleneck(m).train()
    h = torch.randn(2, 4, 50) * 3 + 5.0
    for step in range(3):
        z, t = bn(h)
        assert torch.equal(z, bn.proj(h)) and "codes" not in t and t["loss_commit"] == 0
        assert not bool(bn.initialized)
    assert torch.equal(bn.eval()(h)[0], bn.proj(h))          # evaluation in warm-up: unquantised too
    # a checkpoint taken now resumes at the same point of the warm-up
    resumed = VQBottleneck(m)
    resumed.load_state_dict(bn.state_dict())
    for b in (bn.train(), resumed.train()):
        z, t = b(h)
        assert bool(b.initialized) and "codes" in t
        z_e = b.proj(h).detach().transpose(1, 2).reshape(-1, 4)
        assert torch.cdist(b.codebook, z_e).min(1).values.max() < 0.5
    assert int(bn.steps_seen) == int(resumed.steps_seen) == 4
    old = {k: v for k, v in bn.state_dict().items() if k != "steps_seen"}   # a checkpoint from before
    VQBottleneck(ModelConfig(n_enc=4, n_latent=4, n_codes=8, bottleneck="vqvae")).load_state_dict(old)


def test_jitter_replaces_only_by_neighbours():
    torch.manual_seed(0)
    z = torch.arange(20.0).view(1, 1, 20).expand(3, 2, 20)
    out = jitter(z, 0.5, training=True)
    centre = torch.arange(1.0, 19.0)
    delta = out - centre
    assert set(delta.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (delta != 0).float().mean().item() == pytest.approx(0.5, abs=0.15)
    assert torch.equal(out[:, 0], out[:, 1])   # all channels of a vector move together
    assert torch.equal(jitter(z, 0.5, training=False)[0, 0], centre)


def _demo_batches(cfg, n_batches, seed=0):
    """Random windows of the bundled corpus (a plain stand-in for the slice buffer)."""
    files = sorted(DEMO_CORPUS.glob("*/*.flac"))
    assert files, f"no demo corpus under {DEMO_CORPUS}"
    speakers = sorted({f.parent.name for f in files})
    rng = np.random.default_rng(seed)
    m, p = cfg.model, WaveNetAE(cfg.model).plan(cfg.data.n_win)
    wavs = [(sf.read(f, dtype="float32")[0], speakers.index(f.parent.name)) for f in files[::3]]
    batches = []
    for _ in range(n_batches):
        feats, decs, spks = [], [], []
        for _ in range(cfg.data.n_batch):
            wav, spk = wavs[rng.integers(len(wavs))]
            starts = valid_starts(len(wav), p)
            f, d = cut_window(wav, int(rng.integers(starts.start, starts.stop)), p, m)
            feats.append(f), decs.append(d), spks.append(spk)
        batches.append((torch.from_numpy(np.stack(feats)),
                        mu_law_encode(torch.from_numpy(np.stack(decs)), m.n_quant),
                        torch.tensor(spks)))
    return batches


@pytest.mark.parametrize("bottleneck", ["ae", "vae", "vqvae"])
def test_loss_decreases_on_the_demo_corpus(bottleneck):
    torch.manual_seed(0)
    cfg = _tiny(bottleneck)
    batches = _demo_batches(cfg, 4)
    model = WaveNetAE(cfg.model).train()
    feats = torch.cat([b[0] for b in batches])
    model.encoder.set_feature_stats(feats.mean((0, 2)), feats.std((0, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def ce_on(batch_list):
        with torch.no_grad():
            model.eval()
            v = float(np.mean([model.loss(*b)[1]["ce"].item() for b in batch_list]))
            model.train()
        return v

    before = ce_on(batches)
    for step in range(40):
        loss, _ = model.loss(*batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = ce_on(batches)
    print(bottleneck, "CE before", before, "after", after)
    assert after < before - 1.0


def test_signal_conditioning_equals_the_training_windows():
    """The whole-signal path used by generation/encoding gives the same logits as training
    windows on the same latent grid."""
    torch.manual_seed(0)
    cfg = _tiny("vqvae")
    m = cfg.model
    model = WaveNetAE(m).eval()
    wav = sf.read(sorted(DEMO_CORPUS.glob("*/*.flac"))[0], dtype="float32")[0]
    p = model.plan(cfg.data.n_win)
    left, _ = model.signal_padding(len(wav))
    lc_full, _, g = model.signal_conditioning(wav, torch.tensor(1))
    R = model.receptive_field
    assert lc_full.shape == (1, m.n_lc_out, R + len(wav))
    lc_back = (m.n_kern - 1) * (sum(m.dilations) - m.dilations[0])
    first = p.before + (p.enc_offset - left - p.before) % m.hop     # windows on the signal's grid
    starts = range(first, len(wav) - p.after, 7 * m.hop)
    assert len(starts) >= 3
    for t0 in starts:
        f, d = cut_window(wav, t0, p, m)
        dq = mu_law_encode(torch.from_numpy(d)[None], m.n_quant)
        with torch.no_grad():
            lw, _ = model(torch.from_numpy(f)[None], dq, torch.tensor([1]))
            lf = model.decoder(dq[:, :-1], lc_full[..., t0 - lc_back + R: t0 + p.n_win + R], g)
        assert (lw - lf).abs().max() < 1e-4


def test_vq_reports_dead_codes_before_restarting_them():
    torch.manual_seed(0)
    m = ModelConfig(n_enc=4, n_latent=4, n_codes=8, bottleneck="vqvae", vq_ema_decay=0.5, vq_warmup_steps=0)
    bn = VQBottleneck(m).train()
    with torch.no_grad():
        bn.proj.weight.copy_(torch.eye(4)[:, :, None])
        bn.proj.bias.zero_()
    bn.initialized.fill_(True)                 # test the EMA alone, not the data-dependent init
    bn.ema_count.fill_(0.01)                   # every code nearly unused so far
    h = torch.randn(2, 4, 50) + 5.0            # all far from the initial codebook (~0): few codes used
    _, t = bn(h)
    used = int(t["codes_used"])
    # after this batch's EMA step every code the batch did not use is below the threshold (0.005)
    assert t["dead_codes"].dim() == 0 and t["codes_restarted"].dim() == 0
    assert int(t["dead_codes"]) == m.n_codes - used > 0
    assert int(t["codes_restarted"]) == int(t["dead_codes"])
    assert int((bn.ema_count < bn.dead_threshold).sum()) == 0          # all of them were restarted
    _, t = bn(h)                               # restarted codes start at count 1: none dead now
    assert int(t["dead_codes"]) == 0 and int(t["codes_restarted"]) == 0


def test_vq_without_restart_reports_dead_codes_and_restarts_none():
    m = ModelConfig(n_enc=4, n_latent=4, n_codes=8, bottleneck="vqvae", vq_ema_decay=0.5,
                    vq_dead_restart=False, vq_warmup_steps=0)
    bn = VQBottleneck(m).train()
    bn.initialized.fill_(True)
    bn.ema_count.fill_(0.01)
    _, t = bn(torch.randn(2, 4, 50))
    assert int(t["dead_codes"]) == m.n_codes - int(t["codes_used"])
    assert int(t["codes_restarted"]) == 0
    assert int((bn.ema_count < bn.dead_threshold).sum()) == int(t["dead_codes"])


def test_dead_code_restart_with_a_gradient_learned_codebook_is_refused():
    with pytest.raises(ValueError, match="set vq_dead_restart=false for a gradient-learned codebook"):
        ModelConfig(bottleneck="vqvae", vq_ema_decay=0.0).validate()
    ModelConfig(bottleneck="vqvae", vq_ema_decay=0.0, vq_dead_restart=False).validate()
    ModelConfig(bottleneck="vqvae").validate()                        # the defaults: EMA + restart
