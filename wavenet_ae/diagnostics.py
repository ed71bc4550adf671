"""Is the latent used? Held-out cross-entropy with true vs shuffled latents / speakers, codebook
(vqvae) or KL (vae) statistics, the speaker adversary's accuracy, and (`ProbeTracker`) linear phone
and speaker probes on held-out latents. All in evaluation mode, without gradients."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

# Alert thresholds: below them training warns and flags the progress bar (runlog.Logger); the
# representation benchmark's conditioning-gain target is the same number.
CONDITIONING_GAIN_MIN = 0.02      # nats/sample: the decoder barely uses the latents
PERPLEXITY_MIN = 2.0              # vqvae codebook perplexity: the codebook has collapsed


def speaker_ids(batches) -> torch.Tensor:
    """The sorted set of speaker ids present across all the batches."""
    return torch.unique(torch.cat([b.speaker.flatten().cpu() for b in batches]))


def other_speakers(spk: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each speaker of `spk` replaced by the next id of `ids` (sorted, containing every id of `spk`) in
    cyclic order: deterministic, and always a different speaker when `ids` has two or more."""
    ids = ids.to(spk.device)
    return ids[(torch.searchsorted(ids, spk) + 1) % len(ids)]


@torch.no_grad()
def held_out_diagnostics(model, batches, device="cpu") -> dict:
    """Mean over batches of: ce (nats/sample), ce_shuffled_latents, ce_shuffled_speakers, and
    conditioning_gain / speaker_gain (shuffled minus true). Latents are shuffled by rolling the
    batch by one, which pairs each window with another utterance's latents. Speakers are replaced by
    `other_speakers` (the next speaker id present in the batches, cyclically), so that every window is
    paired with a different speaker; with a single speaker present the speaker gain cannot be measured
    and ce_shuffled_speakers and speaker_gain are NaN."""
    was_training = model.training
    model.eval()
    R = model.receptive_field
    ids = speaker_ids(batches) if len(batches) else torch.zeros(0, dtype=torch.long)
    sums: dict[str, float] = {}
    codes, kl_dims = [], []
    adversary = getattr(model, "adversary", None)
    for b in batches:
        feats, dec_q, spk = b.to(device)
        z, terms = model.encode(feats)
        if adversary is not None:       # share of latent frames whose speaker the adversary names
            hit = adversary.logits(z).argmax(1) == spk[:, None]
            sums["adv_accuracy"] = sums.get("adv_accuracy", 0.0) + hit.float().mean().item()
        target = dec_q[:, R:]
        ce = {}
        runs = [("ce", z, spk), ("ce_shuffled_latents", z.roll(1, 0), spk)]
        if len(ids) >= 2:
            runs.append(("ce_shuffled_speakers", z, other_speakers(spk, ids)))
        for name, zz, ss in runs:
            h, _ = model(feats, dec_q, ss, z_override=zz, head=False)
            ce[name] = model.decoder.linear_cross_entropy(h, target).item()
        for k, v in ce.items():
            sums[k] = sums.get(k, 0.0) + v
        if "codes" in terms:
            codes.append(terms["codes"].flatten().cpu())
        if "kl_per_dim" in terms:
            kl_dims.append(terms["kl_per_dim"].cpu())
    model.train(was_training)
    n = max(1, len(batches))
    out = {k: v / n for k, v in sums.items()}
    out.setdefault("ce_shuffled_speakers", float("nan"))             # one speaker: not measurable
    out["conditioning_gain"] = out["ce_shuffled_latents"] - out["ce"]
    out["speaker_gain"] = out["ce_shuffled_speakers"] - out["ce"]
    if codes:
        out.update(codebook_stats(torch.cat(codes), model.cfg.n_codes))
    if kl_dims:
        kl = torch.stack(kl_dims).mean(0)
        out["kl_per_dim"] = kl.tolist()
        out["active_dims"] = int((kl > 0.01).sum())
    return out


def codebook_stats(codes: torch.Tensor, n_codes: int) -> dict:
    counts = torch.bincount(codes, minlength=n_codes).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"perplexity": math.exp(entropy), "codes_used": int((counts > 0).sum()),
            "bits_per_code": entropy / math.log(2)}


class ProbeTracker:
    """Linear phone and speaker probes (`evaluate.probes.linear_probe`) on the latents of whole files,
    fitted on `fit` utterances and scored on `score` utterances, each call with the model as it is
    now. The MFCC frames, their labels and the MFCC probes' accuracies do not change during training:
    computed once. Files without `<utt>.phones.tsv` alignments give no phone probe (NaN)."""

    def __init__(self, fit, score, model_cfg):
        from .data.corpus import load_or_skip
        # imported here: the evaluate package imports this module
        from .evaluate.probes import Frames, label_at, read_alignment
        from .features import mfcc_features
        m = model_cfg
        span = m.mfcc_win + (m.delta_width - 1) * m.mfcc_hop
        self.sets: dict[str, list] = {}
        for name, utts in (("fit", fit), ("score", score)):
            rows = []
            for u in utts:
                wav = load_or_skip(u.path, m.sample_rate)
                if wav is None:
                    continue
                mf = mfcc_features(wav, m).T
                tm = (np.arange(len(mf)) * m.mfcc_hop + span / 2) / m.sample_rate
                ali = read_alignment(u.path)
                rows.append((wav, ali, Frames(mf, tm, u.speaker, label_at(ali, tm) if ali else None)))
            self.sets[name] = rows
        self.mfcc = {f"probe_{t}_mfcc": _accuracy({k: [r[2] for r in rows] for k, rows in self.sets.items()}, t)
                     for t in ("phone", "speaker")}

    @torch.no_grad()
    def __call__(self, model) -> dict:
        """{probe_phone_latents, probe_speaker_latents, probe_phone_mfcc, probe_speaker_mfcc (frame
        accuracy, NaN when not measurable), probe_seconds (the wall time of this call)}."""
        from .encode import encode_signal
        from .evaluate.probes import Frames, label_at
        t0 = time.time()
        was_training = model.training
        m = model.cfg
        frames = {}
        for name, rows in self.sets.items():
            frames[name] = []
            for wav, ali, mf in rows:
                z, _ = encode_signal(model, wav)
                tz = (np.arange(len(z)) + 0.5) * m.hop / m.sample_rate
                frames[name].append(Frames(z, tz, mf.speaker, label_at(ali, tz) if ali else None))
        model.train(was_training)
        lat = {f"probe_{t}_latents": _accuracy(frames, t) for t in ("phone", "speaker")}
        return {**lat, **self.mfcc, "probe_seconds": time.time() - t0}


def _accuracy(frames: dict, target: str) -> float:
    from .evaluate.probes import linear_probe
    acc = linear_probe(frames["fit"], frames["score"], target)
    return float("nan") if acc is None else acc
