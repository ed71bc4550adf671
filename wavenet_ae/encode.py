"""Latents of a wav file for downstream use.

    python -m wavenet_ae.encode --run-dir DIR --input PATH --out latents.npy [--codes-out codes.npy]

Writes latents (M, n_latent) float32, M = ceil(T / hop): latent m describes the wav segment
[m * hop, (m + 1) * hop) (hop = 320 samples = 20 ms at 16 kHz) — the signal is zero-padded so that
the encoder's field of latent m is centred on that segment. Evaluation mode: VAE means, VQ-VAE
quantised vectors; for a VQ-VAE the code indices (M,) int64 are written too (default
`<out stem>.codes.npy`).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from .rfield import chain_field, encoder_layers, featurizer_layers


def encoder_field(m) -> int:
    """Wav samples one latent reads (MFCC window + deltas + encoder convs)."""
    return chain_field(featurizer_layers(m) + encoder_layers(m))


@torch.no_grad()
def encode_signal(model, wav: np.ndarray):
    """wav (T,) float at the model rate -> latents (M, n_latent) float32 and codes (M,) int64 or None."""
    from .features import mfcc_features
    m = model.cfg
    model.eval()
    T, hop, f = len(wav), m.hop, encoder_field(m)
    if T == 0:
        raise ValueError("empty signal")
    M = math.ceil(T / hop)
    left = max(0, (f - hop) // 2)
    right = (M - 1) * hop + f - left - T
    padded = np.concatenate([np.zeros(left, np.float32), np.asarray(wav, np.float32),
                             np.zeros(max(0, right), np.float32)])
    dev = next(model.parameters()).device
    feats = mfcc_features(torch.from_numpy(padded).to(dev), m)[None]      # on the model's device
    z, terms = model.encode(feats)
    if z.shape[-1] < M:
        raise RuntimeError(f"internal: encoder gave {z.shape[-1]} latents for {M} segments")
    latents = z[0, :, :M].t().contiguous().cpu().numpy().astype(np.float32)
    codes = terms.get("codes")
    codes = None if codes is None else codes[0, :M].cpu().numpy().astype(np.int64)
    return latents, codes


def main(argv: list[str] | None = None) -> int:
    from . import cli
    ap = cli.parser("encode", "Encode a wav file into latents (.npy) with a trained run.")
    cli.add_run_dir(ap)
    ap.add_argument("--input", required=True, help="input audio file (resampled to the model rate)")
    ap.add_argument("--out", required=True, help="latents .npy, shape (M, n_latent)")
    ap.add_argument("--codes-out", help="VQ-VAE code indices .npy (default: <out stem>.codes.npy)")
    cli.add_device(ap)
    a = ap.parse_args(argv)
    a.device = cli.resolve_device(ap, a.device)

    from .data.corpus import CorpusError, load_audio
    from .run_dir import RunDirError, load_run

    def fail(msg: str) -> int:
        cli.fail(ap, msg)

    try:
        run = load_run(a.run_dir, a.device)
    except RunDirError as e:
        return fail(str(e))
    if not Path(a.input).is_file():
        return fail(f"input file {a.input} does not exist")
    try:
        wav = load_audio(a.input, run.config.model.sample_rate)
    except CorpusError as e:
        return fail(f"cannot read input: {e}")
    m = run.config.model
    latents, codes = encode_signal(run.model, wav)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, latents)
    msg = (f"wrote {out}: latents {latents.shape} ({m.sample_rate / m.hop:g} per second, "
           f"{m.bottleneck}, step {run.step})")
    if codes is not None:
        codes_out = Path(a.codes_out) if a.codes_out else out.with_name(out.name.removesuffix(".npy") + ".codes.npy")
        np.save(codes_out, codes)
        msg += f"; codes {codes.shape} -> {codes_out}"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
