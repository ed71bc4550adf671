"""Is the latent used? `diagnostics.held_out_diagnostics` and `codebook_stats` on constructed cases with
known answers."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from wavenet_ae.config import BOTTLENECKS, preset
from wavenet_ae.diagnostics import codebook_stats, held_out_diagnostics
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
    batches = [_Batch(feats=torch.randn(B, m.n_in, p.n_frames) * 3,
                      dec_q=torch.randint(0, m.n_quant, (B, p.dec_len)),
                      speaker=torch.arange(B) % m.n_speakers)
               for _ in range(n_batches)]
    return model, batches


class _Batch(SimpleNamespace):
    """A slice-buffer batch with given features (`Batch.to` computes them from raw windows)."""

    def to(self, device):
        return self.feats.to(device), self.dec_q.to(device), self.speaker.to(device)


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_decoder_without_local_conditioning_has_zero_conditioning_gain(bottleneck):
    model, batches = _model_and_batches(bottleneck)
    before = held_out_diagnostics(model, batches)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.lc_proj.weight.zero_()
    after = held_out_diagnostics(model, batches)
    print(bottleneck, "gain before", before["conditioning_gain"], "after", after["conditioning_gain"])
    assert abs(before["conditioning_gain"]) > 1e-3            # the latents change the prediction
    assert after["conditioning_gain"] == pytest.approx(0.0, abs=1e-6)
    assert after["ce_shuffled_latents"] == pytest.approx(after["ce"], abs=1e-6)


@pytest.mark.parametrize("zeroed", ["speaker embedding", "gc_proj"])
def test_decoder_without_global_conditioning_has_zero_speaker_gain(zeroed):
    model, batches = _model_and_batches("ae")
    before = held_out_diagnostics(model, batches)
    with torch.no_grad():
        if zeroed == "speaker embedding":
            model.speaker.weight.zero_()
        else:
            for layer in model.decoder.layers:
                layer.gc_proj.weight.zero_()
    after = held_out_diagnostics(model, batches)
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
    out = held_out_diagnostics(model, batches)
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


def test_other_speakers_pairs_every_window_with_a_different_speaker():
    from wavenet_ae.diagnostics import other_speakers, speaker_ids
    spk = torch.tensor([0, 0, 1, 1])                       # neighbours share speakers: a roll keeps half
    ids = speaker_ids([SimpleNamespace(speaker=spk)])
    assert ids.tolist() == [0, 1] and other_speakers(spk, ids).tolist() == [1, 1, 0, 0]
    # the cycle runs over the ids present in all batches, in sorted order, with gaps
    batches = [SimpleNamespace(speaker=torch.tensor([7, 3, 3])), SimpleNamespace(speaker=torch.tensor([12, 12, 7]))]
    ids = speaker_ids(batches)
    assert ids.tolist() == [3, 7, 12]
    got = [other_speakers(b.speaker, ids) for b in batches]
    assert [g.tolist() for g in got] == [[12, 7, 7], [3, 3, 12]]
    assert all((g != b.speaker).all() for g, b in zip(got, batches))


def _ce(model, b, spk):
    z, _ = model.encode(b.feats)
    h, _ = model(b.feats, b.dec_q, spk, z_override=z, head=False)
    return model.decoder.linear_cross_entropy(h, b.dec_q[:, model.receptive_field:]).item()


def test_speaker_gain_is_measured_against_a_different_speaker_for_every_window():
    model, batches = _model_and_batches("ae")
    for b in batches:
        b.speaker = torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        model.speaker.weight[1] = 30 * torch.randn_like(model.speaker.weight[1])   # speaker 1: far off
    out = held_out_diagnostics(model, batches)
    model.eval()
    with torch.no_grad():
        true = [_ce(model, b, b.speaker) for b in batches]
        other = [_ce(model, b, torch.tensor([1, 1, 0, 0])) for b in batches]       # every window swapped
        rolled = [_ce(model, b, b.speaker.roll(1, 0)) for b in batches]            # half of them kept
    want = sum(o - t for o, t in zip(other, true)) / len(batches)
    half = sum(r - t for r, t in zip(rolled, true)) / len(batches)
    print("speaker gain", out["speaker_gain"], "by hand", want, "with a roll", half)
    assert abs(want) > 1e-3 and abs(want - half) > 0.2 * abs(want)  # the pairing matters here
    assert out["speaker_gain"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert out["ce_shuffled_speakers"] == pytest.approx(sum(other) / len(batches), rel=1e-6)


def test_speaker_gain_with_a_single_speaker_is_nan_without_its_forward_pass():
    model, batches = _model_and_batches("vqvae")
    keys = set(held_out_diagnostics(model, batches))
    for b in batches:
        b.speaker = torch.full_like(b.speaker, 2)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = held_out_diagnostics(model, batches)
    assert math.isnan(out["speaker_gain"]) and math.isnan(out["ce_shuffled_speakers"])
    assert set(out) == keys                                  # the same keys as with several speakers
    assert math.isfinite(out["conditioning_gain"]) and math.isfinite(out["ce"])
    assert len(calls) == 2 * len(batches)                    # true and shuffled latents only


def test_loss_png_tracks_the_probes_when_validation_has_them(tmp_path):
    """loss.png gets a third panel (the held-out probes over training) exactly when the validation
    records carry probe accuracies; a record without them (e.g. no alignments) is skipped."""
    from PIL import Image
    from wavenet_ae.plots import plot_losses

    def write(valid_extra):
        recs = [{"kind": "train", "step": s, "ce": 5.0 - s / 100} for s in range(1, 101)]
        recs += [{"kind": "valid", "step": s, "ce": 4.0, "ce_shuffled_latents": 4.2, "conditioning_gain": 0.2,
                  "speaker_gain": 0.05, **valid_extra(s)} for s in (25, 50, 75, 100)]
        (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return Image.open(plot_losses(tmp_path)).size

    plain = write(lambda s: {})
    probes = write(lambda s: {} if s == 50 else {"probe_phone_latents": 0.3, "probe_phone_mfcc": 0.5,
                                                 "probe_speaker_latents": 0.2, "probe_speaker_mfcc": 0.6})
    assert plain[1] == probes[1] and probes[0] > 1.4 * plain[0]          # 3 panels instead of 2
