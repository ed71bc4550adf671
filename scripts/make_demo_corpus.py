#!/usr/bin/env python3
"""Regenerate the bundled demo corpus ``wavenet_ae/data/demo_corpus``.

The corpus is a few minutes of synthetic 16 kHz mono English speech from six
clearly distinct "speakers", produced with the Festival speech synthesis
system.  Every utterance comes with a phone alignment written by Festival
itself (the ``Segment`` relation of the synthesised utterance), so the corpus
can be used for phone-probing experiments as well as for training and
voice-conversion demos.

Speakers are derived from the three English Festival voices packaged in
Debian (``festvox-kallpc16k``, ``festvox-kdlpc16k``, ``festvox-us-slt-hts``)
by changing the prosody inside Festival (target F0, duration stretch, HTS
speaking rate) and/or applying a SoX pitch shift after synthesis.  A pitch
shift keeps the duration of the signal unchanged, so Festival's alignment
stays valid; all tempo changes are done inside Festival, which then reports the
modified segment times itself.

Requirements (Debian/Ubuntu)::

    apt-get install festival festvox-kallpc16k festvox-kdlpc16k \
        festvox-us-slt-hts sox
    pip install numpy soundfile

Usage::

    python scripts/make_demo_corpus.py            # rewrites the package copy
    python scripts/make_demo_corpus.py --out /tmp/demo_corpus --seed 0

Output layout (``--out``)::

    <speaker>/<utt_id>.flac        16 kHz, mono, PCM_16 FLAC, peak -1 dBFS
    <speaker>/<utt_id>.phones.tsv  "start\\tend\\tphone" in seconds (incl. pau)
    split.tsv                      "path\\tspeaker\\tsplit" (train/valid/test)
    transcripts.tsv                "path\\tspeaker\\ttext"
    README.md

Utterance ids are ``<speaker>_s<NNN>`` where ``NNN`` indexes ``SENTENCES``
below, so the same number in two speaker folders means the same text
(parallel data for voice conversion).

The output is deterministic for a given ``--seed`` and given versions of
Festival, SoX and libsndfile.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
PEAK_DBFS = -1.0
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "wavenet_ae" / "data" / "demo_corpus"

# Short, varied English sentences (Harvard-sentence style, own wording).
# 7-11 words each so that every voice renders them in roughly 2-6 seconds.
SENTENCES = [
    "The old barn leaned hard against the northern wind.",
    "She poured cold milk into a chipped blue bowl.",
    "A flock of geese crossed the gray autumn sky.",
    "The baker sold fresh bread before the sun came up.",
    "Keep the lid on the pot while the soup boils.",
    "He tied the small boat to a wooden post.",
    "The map was folded badly and torn at the edges.",
    "Bright lamps hung in a line along the harbor wall.",
    "The clock in the hall struck nine times tonight.",
    "Two dogs chased a red ball across the wet lawn.",
    "We planted beans and carrots in the back garden.",
    "The letter arrived three days after the party ended.",
    "Her coat was warm but the sleeves were too short.",
    "A thin layer of dust covered the piano keys.",
    "The train slowed down as it reached the bridge.",
    "Fold the towels neatly and stack them on the shelf.",
    "The children built a tall tower out of blocks.",
    "Rain tapped softly on the roof of the cabin.",
    "He found a silver coin under the kitchen table.",
    "The green paint dried quickly in the summer heat.",
    "Please close the gate so the goats stay inside.",
    "The river rose after a week of heavy storms.",
    "A small bird built its nest in the chimney.",
    "The teacher wrote a long word on the board.",
    "Salt and pepper were placed beside every plate.",
    "The ship sailed north with a load of timber.",
    "Our neighbor fixed the fence with rope and wire.",
    "The candle flickered and then went out at midnight.",
    "A sharp knife makes the job much easier.",
    "The museum opens late on the first Friday.",
    "Thick fog rolled in from the sea at dawn.",
    "She hummed a quiet tune while she washed the dishes.",
    "The farmer counted his sheep twice before dinner.",
    "A loud crash came from the room upstairs.",
    "The soup needs more salt and a little lemon.",
    "He wore brown boots that squeaked on the floor.",
    "The market was crowded with people buying fruit.",
    "Leaves piled up against the door of the shed.",
    "The pilot checked the fuel before the long flight.",
    "My uncle keeps his tools in a metal box.",
    "The moon looked pale behind the drifting clouds.",
    "Cut the rope with care and save the ends.",
    "The young cat slept all day in the sunny window.",
    "A cup of hot tea helps on a cold morning.",
    "The painter mixed yellow and blue to make green.",
    "Heavy snow closed the mountain road for a week.",
    "The boy whistled as he rode his bike to school.",
    "Plums and pears grew in the orchard by the lake.",
    "The judge listened closely to every word spoken.",
    "Turn left at the church and follow the stone wall.",
    "The kettle began to sing on the iron stove.",
    "A gentle breeze moved the curtains in the hall.",
    "The fishermen mended their nets on the beach.",
    "Her voice carried clearly across the empty theater.",
    "The glass jar was full of buttons and string.",
    "We waited an hour for the bus in the rain.",
    "The puppy chewed a hole in my favorite sock.",
    "Tall pines lined both sides of the narrow trail.",
    "The cook burned the toast but saved the eggs.",
    "A bell rang twice to mark the end of class.",
    "The cellar smelled of apples and damp earth.",
    "He stacked the firewood neatly beside the cottage.",
    "The lighthouse beam swept slowly over the dark water.",
    "Pack a spare shirt in case the weather turns.",
    "The quiet library was the best place to think.",
    "A fox slipped under the hedge and disappeared.",
    "The soldiers marched in step down the main street.",
    "Clean brushes last longer than dirty ones.",
    "The doctor told him to rest for three days.",
    "Smoke rose straight up from the village chimneys.",
    "The rusty hinge creaked every time the door moved.",
    "She read the poem aloud to the whole family.",
    "The hikers reached the summit just before noon.",
    "A basket of eggs sat on the kitchen counter.",
    "The wind blew the hat clean off his head.",
    "Fresh paint and new curtains made the room bright.",
    "The garden hose sprang a leak near the tap.",
    "They sang old songs around the camp fire.",
    "The price of wheat went up again this spring.",
    "A narrow path led down to the hidden beach.",
    "The king wore a heavy crown of gold and jade.",
    "Open the window and let the fresh air in.",
    "The cart rolled downhill and struck the fence.",
    "His handwriting was small, neat, and easy to read.",
]


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a Festival voice plus modifications."""

    name: str
    voice: str  # Festival voice function, e.g. "voice_kal_diphone"
    description: str
    # Diphone (LPC) voices: linear-regression F0 target mean/std in Hz.
    f0_mean: float | None = None
    f0_std: float | None = None
    # Diphone voices: Festival's global 'Duration_Stretch (>1 = slower).
    duration_stretch: float | None = None
    # HTS voice: hts_engine "-r" speaking-rate factor (>1 = faster).
    hts_rate: float | None = None
    # Post-synthesis SoX pitch shift in cents (duration preserving).
    pitch_cents: int = 0
    scheme_extra: tuple[str, ...] = field(default_factory=tuple)


SPEAKERS = [
    Speaker(
        name="kal",
        voice="voice_kal_diphone",
        description="kal_diphone (US male, festvox-kallpc16k), unmodified",
    ),
    Speaker(
        name="ked",
        voice="voice_ked_diphone",
        description="ked_diphone (US male, festvox-kdlpc16k), unmodified",
    ),
    Speaker(
        name="slt",
        voice="voice_cmu_us_slt_arctic_hts",
        description="cmu_us_slt_arctic_hts (US female, festvox-us-slt-hts), "
        "unmodified, resampled 32 kHz -> 16 kHz",
    ),
    Speaker(
        name="kal_hi",
        voice="voice_kal_diphone",
        description="kal_diphone with Festival target F0 130 Hz (std 22), "
        "Duration_Stretch 0.95, then SoX pitch +300 cents "
        "(F0 and formants up 3 semitones)",
        f0_mean=130.0,
        f0_std=22.0,
        duration_stretch=0.95,
        pitch_cents=300,
    ),
    Speaker(
        name="ked_lo",
        voice="voice_ked_diphone",
        description="ked_diphone with Festival target F0 80 Hz (std 9), "
        "Duration_Stretch 1.2, then SoX pitch -200 cents "
        "(F0 and formants down 2 semitones)",
        f0_mean=80.0,
        f0_std=9.0,
        duration_stretch=1.2,
        pitch_cents=-200,
    ),
    Speaker(
        name="slt_lo",
        voice="voice_cmu_us_slt_arctic_hts",
        description="cmu_us_slt_arctic_hts with HTS rate 0.9 (slower), "
        "then SoX pitch -400 cents (F0 and formants down 4 semitones), "
        "resampled to 16 kHz",
        hts_rate=0.9,
        pitch_cents=-400,
    ),
]


# --------------------------------------------------------------------------
# Festival
# --------------------------------------------------------------------------

SCHEME_PRELUDE = r"""
(define (demo_dump_segs utt fname)
  "Write one line 'phone end_time' per item of the Segment relation."
  (let ((fd (fopen fname "w")))
    (mapcar
     (lambda (s) (format fd "%s %f\n" (item.name s) (item.feat s "end")))
     (utt.relation.items utt 'Segment))
    (fclose fd)))

(define (demo_synth text wavfile segfile)
  ;; Utterance does not evaluate its arguments, hence the eval.
  (let ((u (eval (list 'Utterance 'Text text))))
    (utt.synth u)
    (utt.save.wave u wavfile 'riff)
    (demo_dump_segs u segfile)))
"""


def _scheme_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def speaker_setup_scheme(spk: Speaker) -> str:
    lines = [f"({spk.voice})"]
    if spk.f0_mean is not None:
        # kal/ked use Int_Targets_LR; only the target (speaker) statistics change.
        lines.append(
            "(set! int_lr_params (list "
            f"(list 'target_f0_mean {spk.f0_mean}) "
            f"(list 'target_f0_std {spk.f0_std}) "
            "(list 'model_f0_mean 170) (list 'model_f0_std 34)))"
        )
    if spk.duration_stretch is not None:
        lines.append(f"(Parameter.set 'Duration_Stretch {spk.duration_stretch})")
    if spk.hts_rate is not None:
        lines.append(
            "(set! hts_engine_params (append hts_engine_params "
            f"(list (list \"-r\" {spk.hts_rate}))))"
        )
    lines.extend(spk.scheme_extra)
    return "\n".join(lines)


def run_festival(spk: Speaker, jobs: list[tuple[str, str]], workdir: Path) -> None:
    """Synthesise ``jobs`` [(utt_id, text)] into workdir/<utt_id>.{wav,segs}."""
    parts = [SCHEME_PRELUDE, speaker_setup_scheme(spk)]
    for utt_id, text in jobs:
        parts.append(
            "(demo_synth {} {} {})".format(
                _scheme_str(text),
                _scheme_str(str(workdir / f"{utt_id}.wav")),
                _scheme_str(str(workdir / f"{utt_id}.segs")),
            )
        )
    script = workdir / f"{spk.name}.scm"
    script.write_text("\n".join(parts) + "\n", encoding="utf-8")
    proc = subprocess.run(
        ["festival", "-b", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    missing = [u for u, _ in jobs if not (workdir / f"{u}.segs").exists()]
    if proc.returncode != 0 or missing:
        sys.stderr.write(proc.stdout)
        raise RuntimeError(
            f"festival failed for speaker {spk.name} "
            f"(rc={proc.returncode}, missing={missing[:5]})"
        )


def read_segs(path: Path) -> list[tuple[float, float, str]]:
    segs = []
    start = 0.0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        phone, end = line.split()
        end = float(end)
        segs.append((start, end, phone))
        start = end
    return segs


# --------------------------------------------------------------------------
# Audio post-processing
# --------------------------------------------------------------------------


def _sox_to_float(wav_in: Path, wav_out: Path, effects: list[str]) -> np.ndarray:
    # -D: no dither (keeps the output deterministic); float output.
    # 6 dB of headroom first so that SoX's pitch/rate effects never clip; the
    # level is restored by peak normalisation afterwards.
    cmd = ["sox", "-D", str(wav_in), "-c", "1", "-e", "floating-point",
           "-b", "32", str(wav_out), "gain", "-6"] + effects
    subprocess.run(cmd, check=True)
    y, sr = sf.read(str(wav_out), dtype="float64", always_2d=False)
    assert sr == SAMPLE_RATE, sr
    if y.ndim > 1:
        y = y.mean(axis=1)
    return y


def _log_envelope(y: np.ndarray, hop: int = 16, win: int = 160) -> np.ndarray:
    e = np.convolve(y ** 2, np.ones(win) / win, mode="same")[::hop]
    return np.log(e + 1e-8)


def estimate_lag(ref: np.ndarray, y: np.ndarray, max_lag_s: float = 0.04,
                 hop: int = 16) -> int:
    """Delay of ``y`` relative to ``ref`` in samples (positive = y is late).

    Cross-correlates log-energy envelopes at 1 ms resolution.
    """
    er, ey = _log_envelope(ref, hop), _log_envelope(y, hop)
    n = min(len(er), len(ey))
    m = int(round(max_lag_s * SAMPLE_RATE / hop))
    core = slice(m, n - m)
    a = er[core] - er[core].mean()
    best, best_l = -np.inf, 0
    for lag in range(-m, m + 1):
        b = ey[m + lag:n - m + lag]
        b = b - b.mean()
        c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
        if c > best:
            best, best_l = c, lag
    return best_l * hop


def shift(y: np.ndarray, lag: int) -> np.ndarray:
    """Advance ``y`` by ``lag`` samples (delay if negative), same length."""
    if lag > 0:
        return np.concatenate([y[lag:], np.zeros(lag)])
    if lag < 0:
        return np.concatenate([np.zeros(-lag), y[:lag]])
    return y


def postprocess(wav_in: Path, tmp_prefix: Path, pitch_cents: int):
    """Resample to 16 kHz (and pitch shift) with SoX; return (float, lag).

    SoX ``pitch`` (WSOLA time stretch + resampling) keeps the length but
    delays/advances the signal by ~10 ms depending on the shift.  That
    constant offset is measured against the unshifted signal and removed so
    that Festival's alignment stays accurate.
    """
    rate = ["rate", "-v", str(SAMPLE_RATE)]
    ref = _sox_to_float(wav_in, tmp_prefix.with_suffix(".16k.wav"), rate)
    if not pitch_cents:
        return ref, 0
    y = _sox_to_float(wav_in, tmp_prefix.with_suffix(".pitch.wav"),
                      ["pitch", str(pitch_cents)] + rate)
    # SoX may differ by a sample or two; the unshifted length is authoritative.
    if len(y) < len(ref):
        y = np.concatenate([y, np.zeros(len(ref) - len(y))])
    y = y[:len(ref)]
    lag = estimate_lag(ref, y)
    return shift(y, lag), lag


def peak_normalise(y: np.ndarray, peak_dbfs: float = PEAK_DBFS) -> np.ndarray:
    peak = float(np.max(np.abs(y)))
    if peak <= 0:
        raise RuntimeError("silent utterance")
    return y * (10.0 ** (peak_dbfs / 20.0) / peak)


def fix_alignment_end(segs, duration: float):
    """Make the alignment cover exactly [0, duration].

    Diphone voices emit a few ms of extra samples after the last segment end
    (and HTS output can round differently), so the final segment -- always
    a ``pau`` silence -- is stretched/shrunk to the file duration.  Interior
    boundaries are left untouched.
    """
    start, end, phone = segs[-1]
    if abs(end - duration) > 0.1:
        raise RuntimeError(f"alignment end {end:.3f}s vs audio {duration:.3f}s")
    if phone != "pau":
        raise RuntimeError(f"last segment is {phone!r}, expected 'pau'")
    segs = list(segs)
    segs[-1] = (start, max(duration, start), phone)
    return segs


# --------------------------------------------------------------------------
# Corpus plan
# --------------------------------------------------------------------------


def plan_corpus(seed: int, n_shared: int, n_unique: int):
    """Return ({speaker: [sentence_idx]}, {sentence_idx: split}).

    ``n_shared`` sentences are read by every speaker (parallel data);
    each speaker additionally reads ``n_unique`` sentences nobody else reads.
    Splits are assigned per *sentence*, so no text appears in two splits:
    one shared sentence is valid and one is test (for all speakers, i.e.
    parallel held-out data), and of each speaker's unique sentences one is
    valid and one is test.
    """
    need = n_shared + n_unique * len(SPEAKERS)
    if need > len(SENTENCES):
        raise ValueError(f"need {need} sentences, have {len(SENTENCES)}")
    if n_shared < 2 or n_unique < 2:
        raise ValueError("need n_shared >= 2 and n_unique >= 2")
    rng = random.Random(seed)
    order = list(range(len(SENTENCES)))
    rng.shuffle(order)
    shared = order[:n_shared]
    split_of: dict[int, str] = {}
    for k, idx in enumerate(shared):
        split_of[idx] = "valid" if k == 0 else "test" if k == 1 else "train"
    plan: dict[str, list[int]] = {}
    pos = n_shared
    for spk in SPEAKERS:
        uniq = order[pos:pos + n_unique]
        pos += n_unique
        for k, idx in enumerate(uniq):
            split_of[idx] = "valid" if k == 0 else "test" if k == 1 else "train"
        plan[spk.name] = sorted(shared + uniq)
    return plan, split_of


# --------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------


def write_readme(out: Path, stats, seed: int, n_shared: int, n_unique: int):
    total = sum(s for _, _, s, _ in stats)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    rows = "\n".join(
        f"| `{name}` | {desc} | {n} | {secs:.1f} |"
        for name, n, secs, desc in stats
    )
    text = f"""# Demo corpus

A small synthetic English speech corpus bundled with `wavenet_ae` for demos,
smoke tests and tutorials (training a tiny model, probing the learned codes
for phone information, voice conversion between speakers).  It is **not** a
substitute for real speech data: all audio is produced by the Festival
text-to-speech system, so it is far more regular than natural speech.

* {len(stats)} speakers, {sum(n for _, n, _, _ in stats)} utterances,
  {total / 60:.1f} minutes in total ({total:.0f} s), utterances of ~2-6 s.
* 16 kHz, mono, 16-bit PCM in FLAC, each file peak-normalised to {PEAK_DBFS:g} dBFS.
* Every utterance has a phone alignment written by Festival.

## Speakers

| speaker | voice and modification | utterances | seconds |
|---|---|---|---|
{rows}

`kal` and `ked` are two different recorded male diphone voices, `slt` is a
female HTS (statistical parametric) voice.  The derived speakers change the
F0 level inside Festival and/or shift F0 *and* formants with SoX `pitch`
(which preserves duration), and change the speaking rate inside Festival
(so the reported alignments already include the tempo change).  SoX `pitch`
moves the signal by a constant ~10 ms; the script measures this offset per
utterance (envelope cross-correlation against the unshifted signal) and
removes it, so the alignments hold for the pitch-shifted speakers too.

## Layout

```
<speaker>/<utt_id>.flac         audio
<speaker>/<utt_id>.phones.tsv   alignment: header "start<TAB>end<TAB>phone", seconds
split.tsv                       path<TAB>speaker<TAB>split  (train / valid / test)
transcripts.tsv                 path<TAB>speaker<TAB>text
```

Paths in the TSV files are relative to this directory.  Utterance ids are
`<speaker>_s<NNN>`, where `NNN` is the index of the sentence in
`scripts/make_demo_corpus.py`; the same `NNN` under two speakers means the
same text (parallel data).  {n_shared} sentences are read by every speaker and
each speaker reads {n_unique} further sentences of its own.

Phone labels are Festival's (`radio` phone set for all three voices, the
same symbol inventory: `aa ae ah ... zh`, silence is `pau`).  Segments are
contiguous, start at 0 and the last (`pau`) ends at the end of the file.  The
alignment is the synthesiser's own segmentation, i.e. "ground truth" for the
synthetic signal, except that the final `pau` is stretched to the exact file
length (the diphone synthesiser emits 20-30 ms of trailing samples after the
last segment end; the HTS voice matches exactly).

## Splits

Splits are assigned per sentence, so no text appears in two splits.  Of the
shared sentences one is `valid` and one is `test` for every speaker (parallel
held-out pairs for voice conversion); of each speaker's own sentences one is
`valid` and one is `test`.  Everything else is `train`, i.e. per speaker
2 of {n_shared + n_unique} utterances ({200 / (n_shared + n_unique):.1f}%) are valid and 2 are test.

## Licence

Festival and the voices used (`festvox-kallpc16k`, `festvox-kdlpc16k`:
CSTR/CMU licence, "use and distribute ... without restriction";
`festvox-us-slt-hts`: CMU ARCTIC / HTS BSD-style licences) are free
software under permissive licences that place no restriction on the
synthesised output.  The sentences and the generated audio/alignments are
original to this project and are distributed under the same licence as
`wavenet_ae`.

## Regenerating

```
apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox
pip install numpy soundfile
python scripts/make_demo_corpus.py --seed {seed}
```

The script is deterministic for a given seed (and given Festival, SoX and
libsndfile versions).  Total size: {size / 1e6:.1f} MB.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def check_tools() -> None:
    for tool in ("festival", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: '{tool}' not found on PATH")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for the sentence assignment (default: 0)")
    ap.add_argument("--n-shared", type=int, default=5,
                    help="sentences read by every speaker (default: 5)")
    ap.add_argument("--n-unique", type=int, default=11,
                    help="sentences per speaker read by nobody else (default: 11)")
    ap.add_argument("--min-dur", type=float, default=2.0)
    ap.add_argument("--max-dur", type=float, default=6.0)
    ap.add_argument("--keep-tmp", action="store_true",
                    help="keep Festival's raw output for inspection")
    args = ap.parse_args(argv)

    check_tools()
    out: Path = args.out.resolve()
    plan, split_of = plan_corpus(args.seed, args.n_shared, args.n_unique)

    # Only remove what this script writes (speaker folders and its files).
    out.mkdir(parents=True, exist_ok=True)
    for spk in SPEAKERS:
        if (out / spk.name).exists():
            shutil.rmtree(out / spk.name)
    for name in ("split.tsv", "transcripts.tsv", "README.md"):
        if (out / name).exists():
            (out / name).unlink()

    tmp = Path(tempfile.mkdtemp(prefix="demo_corpus_"))
    split_rows: list[str] = []
    text_rows: list[str] = []
    stats = []
    out_of_range = []
    try:
        for spk in SPEAKERS:
            spk_tmp = tmp / spk.name
            spk_tmp.mkdir()
            jobs = [(f"{spk.name}_s{idx:03d}", SENTENCES[idx])
                    for idx in plan[spk.name]]
            run_festival(spk, jobs, spk_tmp)
            spk_dir = out / spk.name
            spk_dir.mkdir(parents=True)
            total = 0.0
            lags: list[int] = []
            for (utt_id, text), idx in zip(jobs, plan[spk.name]):
                y, lag = postprocess(spk_tmp / f"{utt_id}.wav",
                                     spk_tmp / utt_id, spk.pitch_cents)
                lags.append(lag)
                y = peak_normalise(y)
                dur = len(y) / SAMPLE_RATE
                segs = fix_alignment_end(read_segs(spk_tmp / f"{utt_id}.segs"), dur)
                sf.write(str(spk_dir / f"{utt_id}.flac"), y, SAMPLE_RATE,
                         format="FLAC", subtype="PCM_16")
                with open(spk_dir / f"{utt_id}.phones.tsv", "w",
                          encoding="utf-8", newline="\n") as f:
                    f.write("start\tend\tphone\n")
                    for s, e, p in segs:
                        f.write(f"{s:.4f}\t{e:.4f}\t{p}\n")
                rel = f"{spk.name}/{utt_id}.flac"
                split_rows.append(f"{rel}\t{spk.name}\t{split_of[idx]}")
                text_rows.append(f"{rel}\t{spk.name}\t{text}")
                total += dur
                if not (args.min_dur <= dur <= args.max_dur):
                    out_of_range.append((utt_id, dur))
            stats.append((spk.name, len(jobs), total, spk.description))
            if spk.pitch_cents:
                ms = np.array(lags) / SAMPLE_RATE * 1000
                print(f"{spk.name}: removed SoX pitch-shift offset of "
                      f"{ms.min():+.0f}..{ms.max():+.0f} ms "
                      f"(median {np.median(ms):+.0f} ms)")
    finally:
        if args.keep_tmp:
            print(f"raw festival output kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    with open(out / "split.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("path\tspeaker\tsplit\n")
        f.write("\n".join(split_rows) + "\n")
    with open(out / "transcripts.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("path\tspeaker\ttext\n")
        f.write("\n".join(text_rows) + "\n")
    write_readme(out, stats, args.seed, args.n_shared, args.n_unique)

    # Summary table.
    counts = {}
    for row in split_rows:
        _, spk_name, split = row.split("\t")
        counts.setdefault(spk_name, {"train": 0, "valid": 0, "test": 0})[split] += 1
    print(f"{'speaker':<8} {'utts':>5} {'seconds':>8} {'train':>6} {'valid':>6} {'test':>5}")
    for name, n, secs, _ in stats:
        c = counts[name]
        print(f"{name:<8} {n:>5} {secs:>8.1f} {c['train']:>6} {c['valid']:>6} {c['test']:>5}")
    tot_n = sum(n for _, n, _, _ in stats)
    tot_s = sum(s for _, _, s, _ in stats)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{'total':<8} {tot_n:>5} {tot_s:>8.1f}   ({tot_s / 60:.2f} min, "
          f"{size / 1e6:.2f} MB in {out})")
    if out_of_range:
        print(f"warning: {len(out_of_range)} utterances outside "
              f"[{args.min_dur}, {args.max_dur}] s: "
              + ", ".join(f"{u}={d:.2f}s" for u, d in out_of_range),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
