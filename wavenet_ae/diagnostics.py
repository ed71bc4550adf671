"""Is the latent used? Held-out cross-entropy with true vs shuffled latents / speakers, and
codebook (vqvae) or KL (vae) statistics. All in evaluation mode, without gradients."""
from __future__ import annotations

import math

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
    for b in batches:
        feats, dec_q, spk = b.to(device)
        z, terms = model.encode(feats)
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
