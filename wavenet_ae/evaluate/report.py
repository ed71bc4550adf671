"""The evaluation report of a run: `run_evaluation` computes it and writes `DIR/report/` (report.json,
report.md, report.html, audio samples, pictures); `report_tables` lays out its tables, which `markdown`
and `html.render` format."""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..data.corpus import load_or_skip
from ..data.slice_buffer import fixed_batches
from ..data.splits import load_corpora
from ..diagnostics import codebook_stats, held_out_diagnostics
from ..features import mfcc_features
from ..plots import plot_codebook_usage, plot_losses, plot_receptive_field, plot_spectrograms
from ..run_dir import load_run
from . import html
from .abx import abx_errors
from .mcd import mel_cepstral_distortion
from .probes import linear_probe, read_alignment, speaker_classifier, utterance_frames


def run_evaluation(run_dir: str, data: str | None = None, n_resynth: int = 2, seconds: float = 2.0,
                   engine: str = "auto", max_train_files: int = 48, device: str = "cpu") -> dict:
    from ..generate import resynthesize
    run = load_run(run_dir, device)
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
                    "n_probe_train_files": len(train_files), "n_held_out_files": len(test_files),
                    "config": cfg.to_dict()}

    # reconstruction
    p = model.plan(cfg.data.n_win)
    batches = fixed_batches(test, cfg.model, p, cfg.data.n_batch, 16)
    loss = held_out_diagnostics(model, batches, device)
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
        # speaker names may hold any character (a manifest's column): keep the file names plain
        plain = re.sub(r"[^\w.-]", "_", tgt_name)
        names = {"input": f"sample{i}_input.wav", "resynth": f"sample{i}_resynth.wav",
                 "conversion": f"sample{i}_to_{plain}.wav"}
        entry = {"file": utt.path, "speaker": utt.speaker, "target_speaker": tgt_name,
                 "mcd_db": mel_cepstral_distortion(wav, rec, sr),
                 "mcd_conversion_db": mel_cepstral_distortion(wav, conv, sr),
                 "conversion_frames_judged_target": float(np.mean(pred == tgt_name)),
                 "conversion_frames_judged_source": float(np.mean(pred == utt.speaker)),
                 "audio": names, "spectrograms": f"sample{i}_spectrograms.png"}
        resynth.append(entry)
        import soundfile as sf
        for name, x in zip(names.values(), (wav, rec, conv)):
            sf.write(out_dir / name, x, sr, subtype="PCM_16")
        plot_spectrograms([("input", wav), ("resynthesis", rec), (f"converted to {tgt_name}", conv)], sr,
                          out_dir / entry["spectrograms"])
    report["resynthesis"] = resynth
    if resynth:
        report["mcd_db_mean"] = float(np.mean([r["mcd_db"] for r in resynth]))

    if (Path(run_dir) / "log.jsonl").exists():
        src = plot_losses(Path(run_dir))
        if src:
            (out_dir / "loss.png").write_bytes(src.read_bytes())
    plot_receptive_field(cfg, out_dir / "receptive_field.png")
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2).encode())
    atomic_write(out_dir / "report.md", markdown(report).encode())
    atomic_write(out_dir / "report.html", html.render(report, report_tables(report), out_dir).encode())
    print(f"report.html (self-contained: figures and audio embedded) written to {out_dir / 'report.html'}",
          file=sys.stderr)
    return report


@dataclass
class Table:
    """One section of the report: a table (`rows` of formatted cells; none: notes only) and notes."""
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def report_tables(r: dict) -> list[Table]:
    """The report's sections, values formatted, for every output format."""
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    rec, pa = r["reconstruction"], r["probe_accuracy"]
    out = [Table("Reconstruction", ["metric", "value"],
                 [[k, fmt(v)] for k, v in rec.items()] + [["bottleneck bits/s", fmt(r["bottleneck_bits_per_s"])]]),
           Table("Linear probes (frame accuracy on held-out files)", ["probe", "latents", "MFCC"],
                 [[t, fmt(pa[f"{t}_latents"]), fmt(pa[f"{t}_mfcc"])] for t in ("phone", "speaker")],
                 ["Phones: higher is better. Speaker: lower on latents = speaker information moved to the "
                  "speaker embedding."])]
    abx, st = r.get("abx"), r.get("abx_setup") or {}
    if abx:
        pct = lambda v: "n/a" if v is None else f"{v:.1f}"
        out.append(Table("ABX error (%, lower is better)", ["speakers", "latents", "MFCC"],
                         [[c, pct(abx["latents"][c]), pct(abx["mfcc"][c])] for c in ("within", "across")],
                         [f"Triphone minimal pairs (ZeroSpeech 2017 condition), DTW over frame-wise cosine "
                          f"distances, scored by zerospeech-libriabx2: {st['items']} phone tokens of {st['files']} "
                          f"files (probe-training and held-out), {st['a_groups']['within']} / "
                          f"{st['a_groups']['across']} A groups within / across speakers, at most "
                          f"{st['max_size_group']} tokens per group and {st['max_x_across']} X speakers per pair; "
                          f"{st['seconds']:.1f} s."]))
    else:
        out.append(Table("ABX error (%, lower is better)", [], [],
                         ["Not computed: needs the zrc_abx2 package (zerospeech-libriabx2) and phone alignments "
                          "with triphone minimal pairs."]))
    out.append(Table("Resynthesis and voice conversion",
                     ["file", "MCD resynthesis (dB)", "converted to", "MCD conversion (dB)", "frames judged target",
                      "judged source"],
                     [[Path(e["file"]).name, f"{e['mcd_db']:.2f}", e["target_speaker"],
                       f"{e['mcd_conversion_db']:.2f}", f"{e['conversion_frames_judged_target']:.2f}",
                       f"{e['conversion_frames_judged_source']:.2f}"] for e in r["resynthesis"]],
                     ["MCD: mel-cepstral distortion to the input, DTW-aligned. Frames judged: share of the "
                      "converted audio's frames the MFCC speaker probe assigns to the target / source speaker."]))
    return out


def markdown(r: dict) -> str:
    cell = lambda v: v.replace("|", "\\|")          # a file or speaker name must not split a row
    lines = [f"# Evaluation of {r['run_dir']} (step {r['step']}, {r['bottleneck']})", "",
             f"Held-out files: {r['n_held_out_files']}; probe training files: {r['n_probe_train_files']}.", ""]
    for t in report_tables(r):
        lines += [f"## {t.title}", ""]
        if t.header:
            lines += ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows] + [""]
        for note in t.notes:
            lines += [note, ""]
    lines += ["Pictures: loss.png, receptive_field.png, sample*_spectrograms.png"
              + (", codebook_usage.png" if r["bottleneck"] == "vqvae" else ""), "",
              "All of it on one page, with the audio to listen to: [report.html](report.html) (self-contained: "
              "open it in a browser, or mail it).", ""]
    return "\n".join(lines)
