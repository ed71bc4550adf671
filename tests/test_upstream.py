"""wavenet_ae.upstream.Upstream: the s3prl upstream contract, checked without s3prl (it does not install
with our torch): shapes, frame counts under the featurizer's rule, batches vs items alone, gradients."""
import math

import numpy as np
import pytest
import torch

import wavenet_ae
from conftest import make_run_dir
from wavenet_ae.upstream import Upstream

HOP = 320


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    """A run dir of an untrained tiny VQ-VAE (quantising: no warm-up)."""
    return make_run_dir(tmp_path / "run", step=3)


@pytest.fixture
def model(run_dir):
    return wavenet_ae.load(run_dir, device="cpu")


def _wavs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.2 * torch.randn(n, generator=g) for n in lengths]


# The rule s3prl's Featurizer applies to an upstream's output (s3prl/upstream/interfaces.py,
# Featurizer.tolist): each item keeps round(len / downsample_rate) frames of the padded batch, and the
# padded length may differ from round(max len / downsample_rate) by less than TOLERABLE_SEQLEN_DIFF
# (5 there; 3 in s3prl/nn/upstream.py). Python's round, as s3prl uses it.
TOLERABLE_SEQLEN_DIFF = 3


def s3prl_tolist(wavs, feature, downsample_rate):
    assert feature.dim() == 3, "(batch_size, max_seq_len, feat_dim)"
    feature_len = [round(len(w) / downsample_rate) for w in wavs]
    assert abs(feature.size(1) - round(max(len(w) for w in wavs) / downsample_rate)) < TOLERABLE_SEQLEN_DIFF
    return [f[:n] for f, n in zip(feature, feature_len)]


LENGTHS = [1, 2, 100, 159, 160, 161, 319, 320, 321, 479, 480, 481, 639, 640, 641, 1000, 3333, 15999, 16000,
           16001, 16159, 16160, 16161, 23456]


def test_frame_counts_meet_the_featurizer_rule_for_every_length(model):
    up = Upstream(model).eval()
    assert up.get_downsample_rates("hidden_states") == HOP == up.get_downsample_rates("last_hidden_state")
    n_enc, n_latent = model.config.model.n_enc, model.config.model.n_latent
    n_states = 3 + model.config.model.n_enc_fc + 1     # stride, mid, residual sum, each FC, latents
    with torch.no_grad():
        for n, w in zip(LENGTHS, _wavs(LENGTHS)):
            out = up([w])
            T = out["last_hidden_state"].shape[1]
            assert T == math.ceil(n / HOP), n
            assert abs(T - round(n / HOP)) <= 1, n
            assert len(out["hidden_states"]) == n_states
            assert all(h.shape == (1, T, n_enc) for h in out["hidden_states"])
            assert out["last_hidden_state"].shape == (1, T, n_latent)
            for key in ("hidden_states", "last_hidden_state"):
                feats = out[key] if key == "last_hidden_state" else out[key][3]
                (cut,) = s3prl_tolist([w], feats, up.get_downsample_rates(key))
                assert len(cut) == round(n / HOP)           # every frame the featurizer asks for exists
    # s3prl's own probe: one second of noise, and the rate it would infer without get_downsample_rates
    out = up(_wavs([16000]))
    assert round(16000 / out["hidden_states"][0].shape[1]) == HOP


def test_latents_equal_model_encode_and_the_padded_latent_state(model):
    up = Upstream(model).eval()
    m = model.config.model
    for w in _wavs([321, 3333, 16000], seed=1):
        out = up([w])
        enc = model.encode(w.numpy())
        np.testing.assert_array_equal(out["last_hidden_state"][0].detach().numpy(), enc.latents)
        np.testing.assert_array_equal(out["hidden_states"][-1][0, :, :m.n_latent].detach().numpy(), enc.latents)
        assert not out["hidden_states"][-1][..., m.n_latent:].any()          # zero-padded to n_enc


def test_a_batch_of_unequal_lengths_gives_each_item_as_alone(model):
    up = Upstream(model).eval()
    lengths = [16161, 1, 700, 320, 9999, 5000]
    wavs = _wavs(lengths, seed=2)
    with torch.no_grad():
        batch = up(wavs)
        T = max(math.ceil(n / HOP) for n in lengths)
        assert batch["last_hidden_state"].shape[:2] == (len(lengths), T)
        for b, (w, n) in enumerate(zip(wavs, lengths)):
            alone = up([w])
            M = math.ceil(n / HOP)
            for i, (hb, ha) in enumerate(zip(batch["hidden_states"] + [batch["last_hidden_state"]],
                                             alone["hidden_states"] + [alone["last_hidden_state"]])):
                # the same frames up to float rounding (the convolutions' batched products)
                err = (hb[b, :M] - ha[0]).abs().max().item()
                print(f"item {b} (len {n}) state {i}: max |batch - alone| = {err:.2e}")
                torch.testing.assert_close(hb[b, :M], ha[0], rtol=1e-5, atol=1e-4)
                assert not hb[b, M:].any()                                      # the padding part is zero
        items = s3prl_tolist(wavs, batch["last_hidden_state"], HOP)
        assert [len(f) for f in items] == [round(n / HOP) for n in lengths]


def test_hidden_states_are_aligned_with_their_frames(model):
    """A burst in segment m changes, in every layer, a set of frames centred on m (a layer cut at the
    wrong offset would centre it one or two frames off)."""
    up = Upstream(model).eval()
    n, m = 40 * HOP, 20
    base = _wavs([n], seed=3)[0]
    hit = base.clone()
    hit[m * HOP:(m + 1) * HOP] += torch.randn(HOP, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = up([base]), up([hit])
    widths = []
    # the encoder's states (the latents follow frame by frame; a VQ's codes change only where the
    # nearest code does, so their changed set need not be contiguous)
    for i, (ha, hb) in enumerate(zip(a["hidden_states"][:-1], b["hidden_states"][:-1])):
        changed = ((ha[0] - hb[0]).abs().amax(dim=1) > 0).nonzero().flatten().tolist()
        print(f"state {i}: frames changed {changed}")
        assert changed == list(range(changed[0], changed[-1] + 1)), i
        assert changed[0] + changed[-1] == 2 * m, i
        widths.append(len(changed))
    assert widths[0] < widths[-1]            # deeper layers see more frames


def test_eval_is_deterministic_train_mode_keeps_the_codebook_and_gradients_flow(model):
    up = Upstream(model)
    wavs = _wavs([4000, 2500], seed=4)
    up.eval()
    with torch.no_grad():
        first = up(wavs)
        again = up(wavs)
    assert not first["last_hidden_state"].requires_grad
    for x, y in zip(first["hidden_states"], again["hidden_states"]):
        assert torch.equal(x, y)
    codebook = model.model.bottleneck.codebook.clone()
    steps = int(model.model.bottleneck.steps_seen)
    up.train()
    assert up.training and not up.bottleneck.training
    out = up(wavs)
    assert torch.equal(out["last_hidden_state"], first["last_hidden_state"])
    assert torch.equal(model.model.bottleneck.codebook, codebook) and int(model.model.bottleneck.steps_seen) == steps
    # s3prl fine-tuning: a loss on the states reaches the encoder's weights (through the VQ's
    # straight-through estimator for the latents); the decoder is not part of the upstream
    names = {n for n, _ in up.named_parameters()}
    assert names and all(n.startswith(("encoder.", "bottleneck.")) for n in names)
    out["last_hidden_state"].pow(2).sum().backward()
    grad = up.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    up.zero_grad()
    out = up(wavs)
    out["hidden_states"][0].sum().backward()
    assert up.encoder.conv_stride.weight.grad.abs().sum() > 0 and up.encoder.fcs[0].weight.grad is None


def test_built_from_a_run_dir_a_model_file_or_a_model(model, run_dir, tmp_path):
    from wavenet_ae import export
    out = tmp_path / "m.safetensors"
    assert export.main(["--run-dir", str(run_dir), "--out", str(out)]) == 0
    w = _wavs([5000], seed=5)
    ref = Upstream(model).eval()(w)["last_hidden_state"]
    for src in (run_dir, str(out)):
        up = Upstream(src, device="cpu").eval()
        assert torch.equal(up(w)["last_hidden_state"], ref)


def test_bad_inputs_are_refused(model):
    up = Upstream(model).eval()
    with pytest.raises(ValueError, match="non-empty 1-D"):
        up([torch.zeros(0)])
    with pytest.raises(ValueError, match=r"non-empty 1-D tensors; got shapes \[\(2, 100\)\]"):
        up([torch.zeros(2, 100)])
    with pytest.raises(ValueError, match="no wavs"):
        up([])
