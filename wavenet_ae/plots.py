"""Pictures of a run (matplotlib, Agg backend): the loss curves of training and the evaluation report's
spectrograms, codebook usage and receptive field."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .rfield import plan


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# held-out linear probes of the validation records (diagnostics.ProbeTracker): key -> legend
PROBE_CURVES = {"probe_phone_latents": "phone, latents", "probe_phone_mfcc": "phone, MFCC",
                "probe_speaker_latents": "speaker, latents", "probe_speaker_mfcc": "speaker, MFCC",
                "adv_accuracy": "speaker adversary"}


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training loss and held-out CE, the conditioning and speaker gains, and (when the
    validation records have them) the held-out probes' accuracies, from log.jsonl."""
    plt = _plt()
    recs = [json.loads(line) for line in open(run_dir / "log.jsonl") if line.strip()]
    tr = [r for r in recs if r.get("kind") == "train"]
    va = [r for r in recs if r.get("kind") == "valid"]
    if not tr:
        return None
    probes = [k for k in PROBE_CURVES if any(k in r for r in va)]
    fig, ax = plt.subplots(1, 3 if probes else 2, figsize=(16 if probes else 11, 4))
    ax[0].plot([r["step"] for r in tr], [r["ce"] for r in tr], label="train CE", lw=0.8)
    if va:
        ax[0].plot([r["step"] for r in va], [r["ce"] for r in va], "o-", label="valid CE")
        ax[0].plot([r["step"] for r in va], [r["ce_shuffled_latents"] for r in va], "s--",
                   label="valid CE, shuffled latents")
        ax[1].plot([r["step"] for r in va], [r["conditioning_gain"] for r in va], "o-", label="latents")
        ax[1].plot([r["step"] for r in va], [r["speaker_gain"] for r in va], "s-", label="speaker")
    for k in probes:
        pts = [(r["step"], r[k]) for r in va if r.get(k) is not None]
        ax[2].plot(*zip(*pts), "--" if k.endswith("mfcc") else "o-", label=PROBE_CURVES[k])
    ax[0].set(xlabel="step", ylabel="nats / sample", title="cross-entropy")
    ax[1].set(xlabel="step", ylabel="nats / sample", title="conditioning gain (shuffled - true)")
    if probes:
        ax[2].set(xlabel="step", ylabel="frame accuracy", title="held-out linear probes", ylim=(0, 1))
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_spectrograms(items, sr: int, out: Path) -> None:
    import librosa
    import librosa.display
    plt = _plt()
    fig, ax = plt.subplots(len(items), 1, figsize=(9, 2.4 * len(items)), sharex=True)
    for a, (title, wav) in zip(np.atleast_1d(ax), items):
        S = librosa.amplitude_to_db(np.abs(librosa.stft(wav, n_fft=512, hop_length=128)), ref=np.max)
        librosa.display.specshow(S, sr=sr, hop_length=128, x_axis="time", y_axis="hz", ax=a)
        a.set(title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_codebook_usage(codes: np.ndarray, n_codes: int, out: Path) -> None:
    plt = _plt()
    counts = np.bincount(codes, minlength=n_codes)
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar(np.arange(n_codes), np.sort(counts)[::-1], width=1.0)
    ax.set(xlabel="code (sorted by use)", ylabel="frames", title=f"codebook usage: {int((counts > 0).sum())}"
           f" of {n_codes} codes used on held-out files")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_receptive_field(cfg, out: Path) -> None:
    """The joint training window: decoder window, encoder window, predicted samples, in samples."""
    plt = _plt()
    p = plan(cfg.model, cfg.data.n_win)
    bars = [("encoder window (MFCC -> latents)", -p.enc_offset, p.enc_len, "tab:blue"),
            ("decoder window (past samples)", -p.dec_context, p.dec_context, "tab:orange"),
            ("predicted samples (N)", 0, p.n_win, "tab:green")]
    fig, ax = plt.subplots(figsize=(9, 2.6))
    for i, (name, start, length, color) in enumerate(bars):
        ax.barh(i, length, left=start, color=color)
        ax.text(start, i + 0.42, f"{name}: [{start}, {start + length})", fontsize=8)
    ax.set_yticks([])
    ax.set(xlabel="samples relative to the first predicted sample",
           title=f"one training window ({p.total_len} samples = {p.total_len / cfg.model.sample_rate:.3f} s)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
