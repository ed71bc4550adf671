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

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.corpus import CorpusError, load_or_skip
from .data.slice_buffer import fixed_batches
from .diagnostics import codebook_stats, evaluate as held_out_loss
from .encode import encode_signal
from .features import mfcc_features
from .rfield import plan
from .run_dir import load_run
from .train import load_corpora


@dataclass
class Frames:
    """Frame-level features with their times (s) and labels, for one utterance."""
    x: np.ndarray            # (n, d)
    t: np.ndarray            # (n,) centre times in seconds
    speaker: str
    phones: list | None      # label per frame (None where outside the alignment)


def read_alignment(audio_path: str) -> list[tuple[float, float, str]] | None:
    p = Path(audio_path)
    tsv = p.with_name(p.stem + ".phones.tsv")
    if not tsv.is_file():
        return None
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return [(float(a), float(b), c) for a, b, c in rows]


def label_at(alignment, times: np.ndarray) -> list:
    starts = np.array([a for a, _, _ in alignment])
    idx = np.searchsorted(starts, times, side="right") - 1
    return [alignment[i][2] if 0 <= i and times[k] < alignment[i][1] else None
            for k, i in enumerate(idx)]


def utterance_frames(model, wav: np.ndarray, path: str,
                     speaker: str) -> tuple[Frames, Frames, np.ndarray | None]:
    """(latent frames, MFCC frames, VQ codes) of one file's audio `wav` (its alignment is read
    beside `path`)."""
    m = model.cfg
    z, codes = encode_signal(model, wav)
    tz = (np.arange(len(z)) + 0.5) * m.hop / m.sample_rate
    mf = mfcc_features(wav, m).T
    span = m.mfcc_win + (m.delta_width - 1) * m.mfcc_hop
    tm = (np.arange(len(mf)) * m.mfcc_hop + span / 2) / m.sample_rate
    ali = read_alignment(path)
    return (Frames(z, tz, speaker, label_at(ali, tz) if ali else None),
            Frames(mf, tm, speaker, label_at(ali, tm) if ali else None), codes)


def linear_probe(train: list[Frames], test: list[Frames], target: str) -> float | None:
    """Frame accuracy of a multinomial logistic regression trained on `train`, tested on `test`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def stack(frames):
        xs, ys = [], []
        for f in frames:
            labels = f.phones if target == "phone" else [f.speaker] * len(f.x)
            if labels is None:
                continue
            keep = [i for i, y in enumerate(labels) if y is not None]
            xs.append(f.x[keep])
            ys += [labels[i] for i in keep]
        return (np.concatenate(xs), np.array(ys)) if xs else (None, None)

    xtr, ytr = stack(train)
    xte, yte = stack(test)
    if xtr is None or xte is None or len(set(ytr)) < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def speaker_classifier(frames: list[Frames]):
    """MFCC frame-level speaker classifier (the probe used to judge voice conversion)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x = np.concatenate([f.x for f in frames])
    y = np.concatenate([[f.speaker] * len(f.x) for f in frames])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x, y)
    return clf


# --- ABX -------------------------------------------------------------------------------------------
# Scored by zerospeech-libriabx2 (import name zrc_abx2), the maintained libri-light ABX, in the
# ZeroSpeech 2017 condition: triphone minimal pairs (same previous and next phone, different centre
# phone), DTW over frame-wise cosine distances, within and across speakers. Its group sampling bounds
# the cost: at most ABX_MAX_SIZE_GROUP tokens per (context, phone, speaker) group and
# ABX_MAX_X_ACROSS X speakers per A/B pair across speakers (the package's defaults).

SILENCES = frozenset({"pau", "sil", "sp", "spn", "h#", "<sil>"})   # never a centre phone
ABX_MAX_SIZE_GROUP = 10
ABX_MAX_X_ACROSS = 5


@dataclass
class Token:
    """One centre phone with its context: a row of the item file."""
    file: str
    onset: float
    offset: float
    phone: str
    prev: str
    next: str
    speaker: str


def triphone_tokens(file: str, speaker: str, alignment) -> list[Token]:
    """Tokens that have a previous and a next phone; silences may be context but never a centre."""
    return [Token(file, a, b, ph, alignment[i - 1][2], alignment[i + 1][2], speaker)
            for i, (a, b, ph) in enumerate(alignment[1:-1], start=1) if ph not in SILENCES]


def abx_group_counts(tokens: list[Token]) -> dict[str, int]:
    """A-groups (context, speaker, phone) that zrc_abx2 can score: within speakers one needs two tokens
    (A and X) and another phone B of the same context and speaker; across speakers B as before and X
    of the same context and phone from another speaker."""
    from collections import Counter, defaultdict
    n = Counter((t.prev, t.next, t.speaker, t.phone) for t in tokens)
    phones, speakers = defaultdict(set), defaultdict(set)
    for c0, c1, s, ph in n:
        phones[c0, c1, s].add(ph)
        speakers[c0, c1, ph].add(s)
    within = sum(1 for (c0, c1, s, ph), k in n.items() if k >= 2 and len(phones[c0, c1, s]) >= 2)
    across = sum(1 for (c0, c1, s, ph) in n if len(phones[c0, c1, s]) >= 2 and len(speakers[c0, c1, ph]) >= 2)
    return {"within": within, "across": across}


def write_item_file(path: Path, tokens: list[Token], first_centre: float, step: float) -> None:
    """The libri-light item file (header, then `file onset offset phone prev next speaker`) with times
    mapped to zrc_abx2's frame convention. It takes frames i with (i + 0.5) * step in
    [onset, offset - step] (ABXFeatureLoader._start_end_indices); ours are centred at
    first_centre + i * step (latents: (i + 0.5) * hop / sr; MFCC: half the analysis span later than
    the frame start). Shifting the onset by -shift and the offset by -shift + step selects exactly
    the frames whose own centre lies in [onset, offset] (1 us of slack against rounding)."""
    shift = first_centre - 0.5 * step
    lines = ["#file onset offset #phone prev-phone next-phone speaker"]
    lines += [f"{t.file} {t.onset - shift - 1e-6:.6f} {t.offset - shift + step + 1e-6:.6f} "
              f"{t.phone} {t.prev} {t.next} {t.speaker}" for t in tokens]
    path.write_text("\n".join(lines) + "\n")


def abx_errors(alignments: list, features: dict[str, tuple[float, list[Frames]]],
               seed: int = 0) -> tuple[dict | None, dict]:
    """ABX error (%) within and across speakers of each feature set, on the same triphone tokens.

    alignments[i]: phone alignment [(start, end, phone), ...] of utterance i, or None;
    features[name] = (frame step in s, [Frames of utterance i]), frames uniformly spaced from the same
    first centre in every utterance (true of the latents and of the MFCC frames). Tokens
    that contain no frame centre of some feature set are dropped for all, so that every feature set
    is scored on the same items. Returns ({name: {"within": %, "across": %}}, setup), the scores
    None when zrc_abx2 is missing or there is no minimal pair."""
    t_start = time.perf_counter()
    try:
        from zrc_abx2 import EvalABX, EvalArgs
    except ImportError as e:       # optional: the `abx` extra in pyproject.toml, scripts/test.sh
        warnings.warn(f"ABX not computed: zrc_abx2 (pip package zerospeech-libriabx2) is not importable ({e})")
        return None, {}
    tokens, files = [], {}
    for i, ali in enumerate(alignments):
        frames = [fr[i] for _, fr in features.values()]
        for tok in triphone_tokens(f"utt{i:05d}", frames[0].speaker, ali or []):
            if all(np.searchsorted(f.t, tok.offset, "right") > np.searchsorted(f.t, tok.onset, "left")
                   for f in frames):
                tokens.append(tok)
                files[tok.file] = i
    groups = abx_group_counts(tokens)
    setup = {"files": len(files), "items": len(tokens), "a_groups": groups,
             "max_size_group": ABX_MAX_SIZE_GROUP, "max_x_across": ABX_MAX_X_ACROSS}
    modes = [m for m in ("within", "across") if groups[m] > 0]
    if not modes:
        return None, setup
    scores: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (step, frames) in features.items():
            d = Path(tmp) / name
            d.mkdir()
            for f, i in files.items():
                np.save(d / f"{f}.npy", np.asarray(frames[i].x, np.float32))
            item = Path(tmp) / f"abx-{name}.item"      # "<dataset>-<subset>" keeps zrc_abx2 quiet
            write_item_file(item, tokens, float(frames[next(iter(files.values()))].t[0]), step)
            args = EvalArgs(path_data=str(d), path_item_file=str(item), file_extension=".npy",
                            feature_size=step, speaker_mode="all" if len(modes) == 2 else modes[0],
                            context_mode="within", distance_mode="cosine", max_size_group=ABX_MAX_SIZE_GROUP,
                            max_x_across=ABX_MAX_X_ACROSS, seed=seed)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")         # its deprecated torch.sparse constructors
                result = EvalABX().eval_abx(args)
            scores[name] = {"within": None, "across": None}
            for r in result:
                scores[name][r["abx-s-condition"]] = 100.0 * float(r["score"])
    setup["seconds"] = time.perf_counter() - t_start
    return scores, setup


def mel_cepstral_distortion(ref: np.ndarray, gen: np.ndarray, sr: int, n_mcep: int = 24) -> float:
    """MCD in dB over DTW-aligned frames, cepstra 1..n_mcep (c0, the energy, excluded).
    librosa's cepstra are of 10 log10(power) = (20 / ln 10) ln(amplitude); MCD is defined on
    cepstra of ln(amplitude), hence the rescaling."""
    import librosa
    kw = dict(sr=sr, n_mfcc=n_mcep + 1, n_fft=1024, hop_length=256, n_mels=40)
    a = librosa.feature.mfcc(y=ref, **kw)[1:]
    b = librosa.feature.mfcc(y=gen, **kw)[1:]
    _, path = librosa.sequence.dtw(X=a, Y=b, metric="euclidean")
    d = (a[:, path[:, 0]] - b[:, path[:, 1]]) * (math.log(10) / 20.0)
    return float((10.0 / math.log(10)) * np.mean(np.sqrt(2.0 * (d ** 2).sum(0))))


def run_evaluation(run_dir: str, data: str | None = None, n_resynth: int = 2, seconds: float = 2.0,
                   engine: str = "auto", max_train_files: int = 48) -> dict:
    from .generate import resynthesize
    run = load_run(run_dir)
    model, cfg = run.model, run.config
    out_dir = Path(run_dir) / "report"
    out_dir.mkdir(exist_ok=True)
    splits = load_corpora(data, run.config)
    train, test = splits["train"], splits["test"]
    if not test.utterances:
        raise SystemExit("error: no held-out files to evaluate on")
    step = max(1, len(train.utterances) // max_train_files)
    # audio of the files probed; files with bad content are skipped with the corpus warning
    audio = {u.path: load_or_skip(u.path, cfg.model.sample_rate)
             for u in train.utterances[::step] + test.utterances}
    train_files = [u for u in train.utterances[::step] if audio[u.path] is not None]
    test_files = [u for u in test.utterances if audio[u.path] is not None]
    if not test_files:
        raise SystemExit("error: none of the held-out files could be loaded (see the warnings above)")
    report: dict = {"run_dir": str(run_dir), "step": run.step, "bottleneck": cfg.model.bottleneck,
                    "n_probe_train_files": len(train_files), "n_held_out_files": len(test_files)}

    # reconstruction
    p = model.plan(cfg.data.n_win)
    batches = fixed_batches(test, cfg.model, p, cfg.data.n_batch, 16)
    loss = held_out_loss(model, batches)
    report["reconstruction"] = {k: v for k, v in loss.items() if not isinstance(v, list)}

    # probes
    feats = {"train": [utterance_frames(model, audio[u.path], u.path, u.speaker) for u in train_files],
             "test": [utterance_frames(model, audio[u.path], u.path, u.speaker) for u in test_files]}
    latent_rate = cfg.model.sample_rate / cfg.model.hop
    if cfg.model.bottleneck == "vqvae" and model.bottleneck.in_warmup():
        report["bottleneck_bits_per_s"] = None      # still in the VQ warm-up: unquantised latents
    elif cfg.model.bottleneck == "vqvae":
        codes = torch.from_numpy(np.concatenate([c for _, _, c in feats["test"]]))
        cb = codebook_stats(codes, cfg.model.n_codes)
        report["reconstruction"].update(perplexity=cb["perplexity"], codes_used=cb["codes_used"])
        report["bottleneck_bits_per_s"] = cb["bits_per_code"] * latent_rate
        plot_codebook_usage(codes.numpy(), cfg.model.n_codes, out_dir / "codebook_usage.png")
    elif cfg.model.bottleneck == "vae":
        # KL to the prior bounds the information a latent frame carries
        report["bottleneck_bits_per_s"] = sum(loss["kl_per_dim"]) / math.log(2) * latent_rate
    else:
        report["bottleneck_bits_per_s"] = None      # continuous latents: unbounded
    probes = {}
    for target in ("phone", "speaker"):
        for name, k in (("latents", 0), ("mfcc", 1)):
            probes[f"{target}_{name}"] = linear_probe([f[k] for f in feats["train"]],
                                                      [f[k] for f in feats["test"]], target)
    report["probe_accuracy"] = probes

    # ABX on every encoded file, probe-training and held-out: it needs no training, and held-out files
    # alone have too few triphone minimal pairs (the demo corpus's 2 per speaker: none within speakers).
    # MFCCs as the probes see them, unnormalised (standardised per coefficient they did worse across
    # speakers on the demo corpus: 20.1% against 11.8%, so this is the stronger baseline).
    utts, enc = train_files + test_files, feats["train"] + feats["test"]
    m = cfg.model
    report["abx"], report["abx_setup"] = abx_errors(
        [read_alignment(u.path) for u in utts],
        {"latents": (m.hop / m.sample_rate, [f[0] for f in enc]),
         "mfcc": (m.mfcc_hop / m.sample_rate, [f[1] for f in enc])})

    # resynthesis and voice conversion
    spk_clf = speaker_classifier([f[1] for f in feats["train"]])
    sr = cfg.model.sample_rate
    resynth = []
    for i, utt in enumerate(test_files[:n_resynth]):
        wav = audio[utt.path][: int(seconds * sr)]
        src = run.speaker_id(utt.speaker)
        tgt_name = run.speakers[(src + 1 + i) % len(run.speakers)]
        rec = resynthesize(model, wav, src, engine=engine, seed=i)
        conv = resynthesize(model, wav, run.speaker_id(tgt_name), engine=engine, seed=i)
        pred = spk_clf.predict(mfcc_features(conv, cfg.model).T)
        entry = {"file": utt.path, "speaker": utt.speaker, "target_speaker": tgt_name,
                 "mcd_db": mel_cepstral_distortion(wav, rec, sr),
                 "mcd_conversion_db": mel_cepstral_distortion(wav, conv, sr),
                 "conversion_frames_judged_target": float(np.mean(pred == tgt_name)),
                 "conversion_frames_judged_source": float(np.mean(pred == utt.speaker))}
        resynth.append(entry)
        import soundfile as sf
        sf.write(out_dir / f"sample{i}_input.wav", wav, sr)
        sf.write(out_dir / f"sample{i}_resynth.wav", rec, sr)
        sf.write(out_dir / f"sample{i}_to_{tgt_name}.wav", conv, sr)
        plot_spectrograms([("input", wav), ("resynthesis", rec), (f"converted to {tgt_name}", conv)], sr,
                          out_dir / f"sample{i}_spectrograms.png")
    report["resynthesis"] = resynth
    if resynth:
        report["mcd_db_mean"] = float(np.mean([r["mcd_db"] for r in resynth]))

    from .train import plot_losses
    if (Path(run_dir) / "log.jsonl").exists():
        src = plot_losses(Path(run_dir))
        if src:
            (out_dir / "loss.png").write_bytes(src.read_bytes())
    plot_receptive_field(cfg, out_dir / "receptive_field.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    rec = r["reconstruction"]
    lines = [f"# Evaluation of {r['run_dir']} (step {r['step']}, {r['bottleneck']})", "",
             f"Held-out files: {r['n_held_out_files']}; probe training files: {r['n_probe_train_files']}.", "",
             "## Reconstruction", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in rec.items()]
    lines += [f"| bottleneck bits/s | {fmt(r['bottleneck_bits_per_s'])} |", "",
              "## Linear probes (frame accuracy on held-out files)", "",
              "| probe | latents | MFCC |", "|---|---|---|"]
    pa = r["probe_accuracy"]
    for t in ("phone", "speaker"):
        lines.append(f"| {t} | {fmt(pa[f'{t}_latents'])} | {fmt(pa[f'{t}_mfcc'])} |")
    lines += ["", "Phones: higher is better. Speaker: lower on latents = speaker information moved to the "
              "speaker embedding.", "", "## ABX error (%, lower is better)", ""]
    abx, st = r.get("abx"), r.get("abx_setup") or {}
    if abx:
        lines += ["| speakers | latents | MFCC |", "|---|---|---|"]
        pct = lambda v: "n/a" if v is None else f"{v:.1f}"
        lines += [f"| {c} | {pct(abx['latents'][c])} | {pct(abx['mfcc'][c])} |" for c in ("within", "across")]
        lines += ["", f"Triphone minimal pairs (ZeroSpeech 2017 condition), DTW over frame-wise cosine distances, "
                  f"scored by zerospeech-libriabx2: {st['items']} phone tokens of {st['files']} files "
                  f"(probe-training and held-out), {st['a_groups']['within']} / {st['a_groups']['across']} "
                  f"A groups within / across speakers, at most {st['max_size_group']} tokens per group and "
                  f"{st['max_x_across']} X speakers per pair; {st['seconds']:.1f} s."]
    else:
        lines.append("Not computed: needs the zrc_abx2 package (zerospeech-libriabx2) and phone alignments "
                     "with triphone minimal pairs.")
    lines += ["", "## Resynthesis and voice conversion", "",
              "| file | MCD resynthesis (dB) | converted to | frames judged target | judged source |",
              "|---|---|---|---|---|"]
    for e in r["resynthesis"]:
        lines.append(f"| {Path(e['file']).name} | {e['mcd_db']:.2f} | {e['target_speaker']} | "
                     f"{e['conversion_frames_judged_target']:.2f} | {e['conversion_frames_judged_source']:.2f} |")
    lines += ["", "Pictures: loss.png, receptive_field.png, sample*_spectrograms.png"
              + (", codebook_usage.png" if r["bottleneck"] == "vqvae" else ""), ""]
    return "\n".join(lines)


# --- pictures --------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wavenet_ae.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--data", help="corpus (default: the bundled demo corpus)")
    ap.add_argument("--n-resynth", type=int, default=2, help="held-out files to resynthesise / convert")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of each file to resynthesise")
    ap.add_argument("--engine", default="auto", choices=["auto", "python", "cpp", "cuda"])
    a = ap.parse_args(argv)
    try:
        report = run_evaluation(a.run_dir, a.data, a.n_resynth, a.seconds, a.engine)
    except CorpusError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(report))
    print(f"report written to {Path(a.run_dir) / 'report'}", file=sys.stderr)


if __name__ == "__main__":
    main()
