"""Evaluate a trained run: `python -m wavenet_ae.evaluate --run-dir DIR [--data PATH]`.

Writes `DIR/report/`: report.json, report.md and pictures. On held-out files:
- reconstruction: cross-entropy (nats/sample), conditioning gain, bottleneck bits per second;
- linear probes (frame accuracy) for phones (needs `<utt>.phones.tsv` alignments, as the bundled
  corpus has) and speakers, on the latents vs on the 39-dim MFCC frames;
- ABX error (ZeroSpeech 2017 triphone condition, within and across speakers) of the latents vs the
  MFCC frames, scored by the `zerospeech-libriabx2` package (`zrc_abx2`; skipped when not installed);
- resynthesis: mel-cepstral distortion (dB, DTW-aligned) of resynthesised vs input audio, and for
  voice conversion the MFCC speaker probe's verdict on the converted audio.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..data.corpus import CorpusError
from .abx import (ABX_MAX_SIZE_GROUP, ABX_MAX_X_ACROSS, SILENCES, Token, abx_errors, abx_group_counts,
                  triphone_tokens, write_item_file)
from .mcd import mel_cepstral_distortion
from .probes import Frames, label_at, linear_probe, read_alignment, speaker_classifier, utterance_frames
from .report import markdown, run_evaluation

__all__ = ["ABX_MAX_SIZE_GROUP", "ABX_MAX_X_ACROSS", "SILENCES", "Frames", "Token", "abx_errors",
           "abx_group_counts", "label_at", "linear_probe", "main", "markdown", "mel_cepstral_distortion",
           "read_alignment", "run_evaluation", "speaker_classifier", "triphone_tokens", "utterance_frames",
           "write_item_file"]


def main(argv=None) -> None:
    from .. import cli
    ap = cli.parser("evaluate", __doc__.split("\n")[0])
    cli.add_run_dir(ap)
    ap.add_argument("--data", help="corpus (default: the bundled demo corpus)")
    ap.add_argument("--n-resynth", type=int, default=2, help="held-out files to resynthesise / convert")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of each file to resynthesise")
    ap.add_argument("--engine", default="auto", choices=["auto", "python", "cpp", "cuda"])
    cli.add_device(ap)
    a = ap.parse_args(argv)
    device = cli.resolve_device(ap, a.device)
    try:
        report = run_evaluation(a.run_dir, a.data, a.n_resynth, a.seconds, a.engine, device=device)
    except CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(report))
    print(f"report written to {Path(a.run_dir) / 'report'}", file=sys.stderr)
