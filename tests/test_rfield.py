"""The receptive-field algebra against autograd (model) and perturbation (librosa featurizer)."""
import numpy as np
import pytest
import torch

from wavenet_ae.config import ModelConfig, preset
from wavenet_ae.features import mfcc_features, n_feature_frames
from wavenet_ae.model import WaveNetAE
from wavenet_ae.rfield import chain_range, featurizer_layers, output_field, plan, table

NARROW = dict(n_enc=12, n_enc_fc=2, n_latent=6, n_lc_out=8, n_global_embed=4, n_res=6, n_dil=6,
              n_skp=8, n_post=8, n_quant=16, bottleneck="ae")


def _paper_geometry(**kw):
    m = preset("paper").model
    for k, v in {**NARROW, **kw}.items():
        setattr(m, k, v)
    return m


CONFIGS = {
    "tiny": lambda: ModelConfig(**{**preset("tiny").model.__dict__, **NARROW, "jitter_prob": 0.0}),
    "paper_geometry": lambda: _paper_geometry(jitter_prob=0.0),
    "odd_strides": lambda: ModelConfig(**NARROW, mfcc_hop=80, enc_stride=4, enc_kern=5,
                                       enc_stride_kern=5, delta_width=5, n_lc_kern=1, jitter_prob=0.0,
                                       lc_upsample_strides=[4, 4, 4, 5],
                                       lc_upsample_kern_sizes=[5, 7, 4, 9],
                                       n_kern=3, n_blocks=2, n_block_layers=3),
    "hop480_k4": lambda: ModelConfig(**NARROW, mfcc_win=320, enc_stride=3, enc_stride_kern=3,
                                     jitter_prob=0.0, lc_upsample_strides=[8, 6, 10],
                                     lc_upsample_kern_sizes=[8, 11, 10], n_kern=4,
                                     n_blocks=3, n_block_layers=2),
    "dilation_gt_window": lambda: ModelConfig(**NARROW, jitter_prob=0.0, n_blocks=1,
                                              n_block_layers=11),        # R = 2048 > N
}


def _dependencies(model, p, j, seed=0):
    """Nonzero-gradient index sets of output j w.r.t. decoder input, conditioning, latents, frames."""
    m = model.cfg
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, m.n_in, p.n_frames, generator=g, dtype=torch.float64, requires_grad=True)
    dec_q = torch.randint(0, m.n_quant, (1, p.dec_len - 1), generator=g)
    z, _ = model.encode(feats)
    z.retain_grad()
    lc = model.local_conditioning(z, p)
    lc.retain_grad()
    x = model.decoder.embed(dec_q).transpose(1, 2).detach().requires_grad_()
    logits = model.decoder.forward_embedded(x, lc, model.speaker(torch.tensor([0])))
    assert logits.shape == (1, m.n_quant, p.n_win)
    logits[..., j].sum().backward()

    def nz(t):
        idx = torch.nonzero(t.grad[0].abs().sum(0)).flatten()
        return (int(idx.min()), int(idx.max()), len(idx))
    return {"dec_wav": nz(x), "lc": nz(lc), "latents": nz(z), "frames": nz(feats)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_shapes_are_consistent(name):
    m = CONFIGS[name]()
    n_win = 4 * m.hop
    p = plan(m, n_win)
    assert n_feature_frames(p.enc_len, m) == p.n_frames
    model = WaveNetAE(m).double().eval()
    z, _ = model.encode(torch.zeros(1, m.n_in, p.n_frames, dtype=torch.float64))
    assert z.shape[-1] == p.n_latents
    assert model.conditioning(z).shape[-1] >= p.lc_crop + p.lc_len
    # the whole of every window is used: nothing is read that no prediction needs
    f = output_field(m, p, 0, n_win - 1)
    assert f["dec_wav"] == (0, p.dec_len - 2)
    assert f["latents"] == (0, p.n_latents - 1)
    assert f["frames"] == (0, p.n_frames - 1)
    assert f["enc_wav"] == (0, p.enc_len - 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_field_matches_autograd(name):
    torch.manual_seed(0)
    m = CONFIGS[name]()
    p = plan(m, 3 * m.hop)
    model = WaveNetAE(m).double().eval()
    rng = np.random.default_rng(1)
    for j in sorted({0, 1, m.hop - 1, m.hop, p.n_win - 1, *rng.integers(0, p.n_win, 3).tolist()}):
        model.zero_grad()
        got = _dependencies(model, p, j)
        want = output_field(m, p, j, j)
        for key in got:
            lo, hi, count = got[key]
            print(name, j, key, "autograd", (lo, hi), "algebra", want[key])
            assert (lo, hi) == want[key], (name, j, key)
            if key != "lc":  # the dilation tree reads conditioning sparsely; its hull is exact
                assert count == hi - lo + 1, f"{key}: gaps in the dependency set"


def test_jitter_field_is_the_union_over_random_draws():
    """With jitter on (training), output j may read the neighbours of its latents: the algebra's
    kernel-3 jitter layer must equal the union of dependencies over draws, and contain each draw."""
    m = ModelConfig(**{**preset("tiny").model.__dict__, **NARROW, "jitter_prob": 0.5})
    p = plan(m, 2 * m.hop)
    model = WaveNetAE(m).double().train()
    j = p.n_win // 2
    want = output_field(m, p, j, j)["latents"]
    lo, hi = 10 ** 9, -1
    for seed in range(40):
        torch.manual_seed(seed)
        model.zero_grad()
        got = _dependencies(model, p, j, seed)["latents"]
        assert want[0] <= got[0] and got[1] <= want[1]
        lo, hi = min(lo, got[0]), max(hi, got[1])
    assert (lo, hi) == want


@pytest.mark.parametrize("name", ["tiny", "odd_strides", "hop480_k4"])
def test_featurizer_field_matches_perturbation(name):
    """librosa MFCC+deltas: perturbing wav sample s changes exactly the frames whose field holds s."""
    m = CONFIGS[name]()
    layers = featurizer_layers(m)
    span = chain_range(layers, 0, 0)[1] + 1
    n = span + 6 * m.mfcc_hop + 17
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(n)).astype(np.float32)
    base = mfcc_features(wav, m)
    assert base.shape == (m.n_in, n_feature_frames(n, m))
    fields = [chain_range(layers, f, f) for f in range(base.shape[1])]
    probes = {0, 1, m.mfcc_hop - 1, m.mfcc_hop, span - 1, span, n - 1, *rng.integers(0, n, 12).tolist()}
    for s in sorted(probes):
        w = wav.copy()
        w[s] += 0.05
        changed = set(np.nonzero(np.abs(mfcc_features(w, m) - base).max(0) > 0)[0].tolist())
        expected = {f for f, (lo, hi) in enumerate(fields) if lo <= s <= hi}
        assert changed == expected, (name, s)


def test_table_lists_every_layer():
    cfg = preset("paper")
    text = table(cfg)
    assert "dilated19" in text and "upsample3" in text and "mfcc" in text
    assert "receptive field 2047" in text
