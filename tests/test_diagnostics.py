"""Is the latent used? `diagnostics.evaluate` and `codebook_stats` on constructed cases with known answers."""
import math
from types import SimpleNamespace

import pytest
import torch

from wavenet_ae.config import BOTTLENECKS, preset
from wavenet_ae.diagnostics import codebook_stats, evaluate
from wavenet_ae.model import WaveNetAE


def _model_and_batches(bottleneck, n_batches=2, B=4, seed=0):
    """A randomly initialised tiny model and batches of random windows, every window of a batch from
    another speaker (so that rolling the batch changes each window's latents and speaker).
    At initialisation the conditioning barely moves the logits (gains ~1e-6 nats, float rounding),
    so the conditioning paths and the output layer are amplified: a model that surely depends on its
    latents and speaker, if not in a useful way (its gains are of either sign)."""
    torch.manual_seed(seed)
    cfg = preset("tiny")
    cfg.model.bottleneck = bottleneck
    cfg.model.vq_warmup_steps = 0                  # quantise from the start
    model = WaveNetAE(cfg.model)
    with torch.no_grad():
        for p in [*model.conditioning.parameters(), model.speaker.weight, model.decoder.post2.weight,
                  *(w for layer in model.decoder.layers for w in (layer.lc_proj.weight, layer.gc_proj.weight))]:
            p.mul_(10)
    m, p = cfg.model, model.plan(cfg.data.n_win)
    batches = [SimpleNamespace(feats=torch.randn(B, m.n_in, p.n_frames) * 3,
                               dec_q=torch.randint(0, m.n_quant, (B, p.dec_len)),
                               speaker=torch.arange(B) % m.n_speakers)
               for _ in range(n_batches)]
    return model, batches


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_decoder_without_local_conditioning_has_zero_conditioning_gain(bottleneck):
    model, batches = _model_and_batches(bottleneck)
    before = evaluate(model, batches)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.lc_proj.weight.zero_()
    after = evaluate(model, batches)
    print(bottleneck, "gain before", before["conditioning_gain"], "after", after["conditioning_gain"])
    assert abs(before["conditioning_gain"]) > 1e-3            # the latents change the prediction
    assert after["conditioning_gain"] == pytest.approx(0.0, abs=1e-6)
    assert after["ce_shuffled_latents"] == pytest.approx(after["ce"], abs=1e-6)


@pytest.mark.parametrize("zeroed", ["speaker embedding", "gc_proj"])
def test_decoder_without_global_conditioning_has_zero_speaker_gain(zeroed):
    model, batches = _model_and_batches("ae")
    before = evaluate(model, batches)
    with torch.no_grad():
        if zeroed == "speaker embedding":
            model.speaker.weight.zero_()
        else:
            for layer in model.decoder.layers:
                layer.gc_proj.weight.zero_()
    after = evaluate(model, batches)
    print(zeroed, "speaker gain before", before["speaker_gain"], "after", after["speaker_gain"])
    assert abs(before["speaker_gain"]) > 1e-3
    assert after["speaker_gain"] == pytest.approx(0.0, abs=1e-6)
    assert after["ce_shuffled_speakers"] == pytest.approx(after["ce"], abs=1e-6)


def test_collapsed_codebook_carries_nothing_the_decoder_could_use():
    """Every frame on one code: perplexity 1, and shuffling the latents changes nothing."""
    model, batches = _model_and_batches("vqvae")
    bn = model.bottleneck
    with torch.no_grad():
        bn.codebook.zero_()
        bn.codebook[5] = 100.0
    bn.initialized.fill_(True)
    out = evaluate(model, batches)
    assert out["perplexity"] == pytest.approx(1.0) and out["codes_used"] == 1
    assert out["conditioning_gain"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n_codes", [1, 16, 512])
def test_codebook_stats_of_constant_and_uniform_codes(n_codes):
    same = codebook_stats(torch.full((1000,), n_codes - 1), n_codes)
    assert same["perplexity"] == pytest.approx(1.0) and same["codes_used"] == 1
    assert same["bits_per_code"] == pytest.approx(0.0, abs=1e-12)
    uniform = codebook_stats(torch.arange(n_codes).repeat(3), n_codes)
    assert uniform["perplexity"] == pytest.approx(n_codes) and uniform["codes_used"] == n_codes
    assert uniform["bits_per_code"] == pytest.approx(math.log2(n_codes), abs=1e-9)
    quarter = codebook_stats(torch.arange(max(1, n_codes // 4)).repeat(5), n_codes)   # a quarter in use
    assert quarter["perplexity"] == pytest.approx(max(1, n_codes // 4))
