"""Representation experiment (issues #9 and #20): what do the latents of each bottleneck carry, and what
does each remedy of issue #20 do to them?

    python benchmarks/representation.py [--preset tiny|small|paper] [--bottlenecks ae,vae,vqvae]
        [--variants baseline,cmvn,...] [--variant NAME=KEY=VAL,KEY=VAL ...] [--seeds 0] [--steps N]
        [--track 0.5] [--n-resynth 0 --seconds 2] [--out runs/representation] [--all-runs] [--threads 1]
        [--parallel 2] [--table-only] [--at-step K]

For each variant V, bottleneck B and seed S it trains on the bundled demo corpus with exactly

    python -m wavenet_ae.train --run-dir OUT/V-B-seedS --preset PRESET --seed S --max-steps STEPS \
        --set bottleneck=B validate_every=250 probe_files=24 [the variant's KEY=VAL ...]

(without --variants the runs are OUT/B-seedS, as before; a finished run is a no-op, an interrupted one
resumes from its last checkpoint), then evaluates it with `python -m wavenet_ae.evaluate --run-dir RUN
--n-resynth N --seconds SEC` (held-out reconstruction, linear probes, ABX; with N > 0 resynthesis and the
voice-conversion verdict of N files). `--track F` (fractions of STEPS, e.g. 0.5) also trains to those
steps first and evaluates there, keeping that report as RUN/report-stepK/: the learning-rate schedule
does not depend on max_steps and resume is exact, so the run is the same as one trained straight
through. --parallel runs go side by side, each with OMP_NUM_THREADS=--threads; their output is
appended to OUT/NAME.out. Built-in variants (VARIANTS below) are the remedies of issue #20; --variant
adds or redefines one.

`--table-only` trains and evaluates nothing and tabulates every evaluated run under OUT; `--at-step K`
tabulates the runs as they stood at step K (validation records up to K, the report made at K: a
screening's budget, e.g. runs trained to K beside longer ones tracked at K), into
OUT/representation-stepK.md (and its pictures).

Prints, and writes to OUT/representation.md, a table of the results and one line per target of the
issues (met / missed, with the numbers); OUT/conditioning_gain.png plots the conditioning gain and the
validation cross-entropy against the step, one line per run. Training minutes are summed from the
timestamps of log.jsonl's training records (start-up and the time between an interruption and its
resume are not counted).

On the demo corpus the MFCCs' within-speaker ABX error is ~0.2%: its synthetic voices say the same
triphone in the same context almost identically, so that target is close to out of reach there; the
across-speaker condition is the informative one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402

from wavenet_ae.config import PRESETS, preset  # noqa: E402
from wavenet_ae.diagnostics import CONDITIONING_GAIN_MIN  # noqa: E402  (training's alert threshold)

# The remedies of issue #20, one --set list each; `combo` joins those meant to act together.
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "cmvn": ["cmvn_frames=101"],                   # 1 s sliding-window CMVN of the encoder input
    "jitter05": ["jitter_prob=0.5"],               # bshall's ZeroSpeech value
    "dec_noise": ["dec_input_noise=0.25"],         # a quarter of the autoregressive inputs randomised
    "adversary": ["adv_weight=0.1"],               # speaker-adversarial loss, gradient reversal
    "codes64": ["n_codes=64"],                     # lower bitrate: 6 bits per 50 Hz frame
    "latent16": ["n_latent=16"],                   # lower-dimensional latents
    "spk_lc": ["speaker_in_lc=true"],              # speaker embedding also in the local conditioning
    "spk_wide": ["n_global_embed=128"],            # a wider speaker embedding
    "short_ctx": ["n_block_layers=8"],             # 2 x 8 layers: 511 past samples (32 ms) instead of 2047
    "combo": ["cmvn_frames=101", "jitter_prob=0.5", "dec_input_noise=0.25", "adv_weight=0.1",
              "speaker_in_lc=true"],
}
# steps of a run unless --steps says otherwise: the preset's own, except tiny's earlier experiments'
DEFAULT_STEPS = {"tiny": 3000}
VALIDATE_EVERY, PROBE_FILES = 250, 24


def run_name(variant: str | None, bottleneck: str, seed: int) -> str:
    return f"{variant}-{bottleneck}-seed{seed}" if variant else f"{bottleneck}-seed{seed}"


def run_one(out: Path, variant: str | None, sets: list[str], bottleneck: str, seed: int, steps: int,
            threads: int, preset_name: str = "tiny", track: tuple[float, ...] = (), n_resynth: int = 0,
            seconds: float = 2.0) -> int:
    """Train (or resume, or find finished) and evaluate one run, at each tracked step and at the end;
    returns the first non-zero exit code."""
    name = run_name(variant, bottleneck, seed)
    run_dir = out / name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    train = lambda n: [sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run_dir), "--preset",
                       preset_name, "--seed", str(seed), "--max-steps", str(n), "--set",
                       f"bottleneck={bottleneck}", f"validate_every={VALIDATE_EVERY}", f"probe_files={PROBE_FILES}",
                       *sets]
    evaluate = [sys.executable, "-m", "wavenet_ae.evaluate", "--run-dir", str(run_dir), "--n-resynth",
                str(n_resynth), "--seconds", str(seconds)]
    stops = sorted({round(f * steps) for f in track if 0 < round(f * steps) < steps})
    with open(out / f"{name}.out", "a") as log:
        def call(cmd) -> int:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if rc:
                print(f"{name}: `{' '.join(cmd[1:4])}` failed with exit code {rc}; see {log.name}",
                      file=sys.stderr)
            return rc
        for k in stops:
            kept = run_dir / f"report-step{k}"
            if (kept / "report.json").exists():
                continue
            rc = call(train(k)) or call(evaluate)
            if rc:
                return rc
            if json.loads((run_dir / "report" / "report.json").read_text())["step"] == k:
                os.replace(run_dir / "report", kept)
            else:       # the run was already past k (resumed after its report there was lost)
                print(f"{name}: already past step {k}; no report kept there", file=sys.stderr)
        for cmd in (train(steps), evaluate):
            rc = call(cmd)
            if rc:
                return rc
    print(f"{name}: done", file=sys.stderr, flush=True)
    return 0


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in open(path) if line.strip()] if path.exists() else []


def training_minutes(records: list[dict]) -> float | None:
    """Sum of the intervals between consecutive training records; an interval in which the step does
    not advance (a resume from an earlier checkpoint) or that lasts over 5 times the median (the
    process was down) is left out."""
    tr = [r for r in records if r.get("kind") == "train"]
    dts = [b["time"] - a["time"] for a, b in zip(tr, tr[1:]) if b["step"] > a["step"]]
    if not dts:
        return None
    limit = 5 * statistics.median(dts)
    return sum(dt for dt in dts if dt <= limit) / 60


def report_at(run_dir: Path, at_step: int | None = None) -> dict:
    """The run's evaluation report ({} if none): the final one, or the one made at `at_step` (the final
    one or a tracked RUN/report-stepK)."""
    for path in [run_dir / "report" / "report.json"] + ([run_dir / f"report-step{at_step}" / "report.json"]
                                                         if at_step else []):
        if path.exists():
            rep = json.loads(path.read_text())
            if at_step is None or rep.get("step") == at_step:
                return rep
    return {}


def summarize(run_dir: Path, at_step: int | None = None) -> dict:
    """One table row from the run's config, log and evaluation report; with `at_step`, as the run stood
    at that step (validation records up to it, the report made there)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    rep = report_at(run_dir, at_step)
    records = [r for r in read_log(run_dir) if at_step is None or r.get("step", 0) <= at_step]
    valid = [r for r in records if r.get("kind") == "valid"]
    last = valid[-1] if valid else {}
    mid = min(valid, key=lambda r: abs(r["step"] - last["step"] / 2)) if len(valid) > 1 else {}
    rec, probes = rep.get("reconstruction", {}), rep.get("probe_accuracy", {})
    abx = rep.get("abx") or {}
    pair = lambda d, a, b: (d.get(a), d.get(b)) if d else None           # (latents, MFCC)
    bottleneck = cfg["model"]["bottleneck"]
    vc = [e["conversion_frames_judged_target"] for e in rep.get("resynthesis", [])]
    tracked = {}
    for kept in sorted(run_dir.glob("report-step*/report.json")):
        r = json.loads(kept.read_text())
        if at_step is None or r["step"] < at_step:
            tracked[r["step"]] = _report_figures(r)
    return {
        "name": run_dir.name, "variant": _variant_of(run_dir.name, bottleneck), "bottleneck": bottleneck,
        "seed": cfg["train"]["seed"],
        "steps": rep.get("step", last.get("step")), "minutes": training_minutes(records),
        "valid_ce": last.get("ce"), "gain": last.get("conditioning_gain"),
        "gain_mid": mid.get("conditioning_gain"), "speaker_gain": last.get("speaker_gain"),
        "n_codes": cfg["model"]["n_codes"],
        "perplexity": rec.get("perplexity") if bottleneck == "vqvae" else None,
        "codebook": (rec.get("perplexity"), rec.get("codes_used")) if bottleneck == "vqvae" else None,
        "active_dims": rec.get("active_dims") if bottleneck == "vae" else None,
        "phone": pair(probes, "phone_latents", "phone_mfcc"),
        "speaker": pair(probes, "speaker_latents", "speaker_mfcc"),
        "abx_within": (abx["latents"]["within"], abx["mfcc"]["within"]) if abx else None,
        "abx_across": (abx["latents"]["across"], abx["mfcc"]["across"]) if abx else None,
        "n_speakers": len(json.loads((run_dir / "speakers.json").read_text())),
        "validation": [(r["step"], r["conditioning_gain"], r["ce"]) for r in valid],
        # issue #20: the same figures over training, and the voice-conversion verdict
        "speaker_gain_mid": mid.get("speaker_gain"),
        "gains_mid_end": (mid.get("conditioning_gain"), last.get("conditioning_gain")) if mid else None,
        "spk_gains_mid_end": (mid.get("speaker_gain"), last.get("speaker_gain")) if mid else None,
        "probe_phone_mid_end": (mid.get("probe_phone_latents"), last.get("probe_phone_latents")) if mid else None,
        "adv_accuracy": last.get("adv_accuracy"),
        "vc_target": sum(vc) / len(vc) if vc else None,
        "valid_seconds": last.get("valid_seconds"),
        "tracked": tracked,
        "probe_mfcc_valid": {t: last.get(f"probe_{t}_mfcc") for t in ("phone", "speaker")},
        "tracking": [(r["step"], r.get("speaker_gain"), r.get("probe_phone_latents"), r.get("probe_speaker_latents"))
                     for r in valid],
        "track_vc_phone": _track_cell(tracked),
    }


def _variant_of(name: str, bottleneck: str) -> str:
    """`V-B-seedS` -> V; `B-seedS` (no variant) -> '-'."""
    head = name.rsplit("-seed", 1)[0]
    return head[: -len(bottleneck) - 1] if head.endswith(f"-{bottleneck}") else "-"


def _report_figures(r: dict) -> dict:
    probes, abx = r.get("probe_accuracy", {}), r.get("abx") or {}
    vc = [e["conversion_frames_judged_target"] for e in r.get("resynthesis", [])]
    return {"phone": probes.get("phone_latents"), "abx_across": abx.get("latents", {}).get("across"),
            "vc_target": sum(vc) / len(vc) if vc else None}


def _track_cell(tracked: dict) -> str | None:
    """'step K: phone probe / ABX across / VC target' of each tracked report, for the table."""
    f = lambda v, spec: "n/a" if v is None else format(v, spec)
    return "; ".join(f"{k}: {f(t['phone'], '.3f')} / {f(t['abx_across'], '.1f')} / {f(t['vc_target'], '.2f')}"
                     for k, t in sorted(tracked.items())) or None


COLUMNS = [("bottleneck", "bottleneck"), ("seed", "seed"), ("steps", "steps"), ("minutes", "train min"),
           ("valid_ce", "valid CE"), ("gain", "cond. gain"), ("speaker_gain", "speaker gain"),
           ("codebook", "perplexity / codes used"), ("active_dims", "active dims"),
           ("phone", "phone probe lat / MFCC"), ("speaker", "speaker probe lat / MFCC"),
           ("abx_within", "ABX within % lat / MFCC"), ("abx_across", "ABX across % lat / MFCC")]


# the ablation of issue #20: one row per variant x bottleneck x seed; pairs read mid-run / end
# (validation records) or latents / MFCC (the evaluation report)
COLUMNS_20 = [("variant", "variant"), ("bottleneck", "bottleneck"), ("seed", "seed"), ("steps", "steps"),
              ("minutes", "train min"), ("valid_ce", "valid CE"), ("gains_mid_end", "cond. gain mid / end"),
              ("spk_gains_mid_end", "speaker gain mid / end"), ("codebook", "perplexity / codes used"),
              ("probe_phone_mid_end", "phone probe (valid) mid / end"), ("phone", "phone probe lat / MFCC"),
              ("speaker", "speaker probe lat / MFCC"), ("abx_within", "ABX within % lat / MFCC"),
              ("abx_across", "ABX across % lat / MFCC"), ("vc_target", "VC judged target"),
              ("adv_accuracy", "adversary acc."), ("track_vc_phone", "tracked: step: phone / ABX across / VC")]

SPEAKER_GAIN_TARGET = 0.1      # nats/sample (issue #20)
VC_TARGET = 0.5                # share of converted frames judged as the target speaker (issue #20)


def _cmp(a, b, strict: bool = False) -> bool:
    """a >= b (a > b if strict); False when either is unknown."""
    return a is not None and b is not None and (a > b if strict else a >= b)


def _num(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _lat(r: dict, k: str):
    return r[k][0] if r[k] else None


def _mfcc(r: dict, k: str):
    return r[k][1] if r[k] else None


def _speaker_bound(r: dict):
    """Midway from chance to the MFCC speaker probe."""
    return None if _mfcc(r, "speaker") is None else (1 / r["n_speakers"] + _mfcc(r, "speaker")) / 2


def _target_lines(checks, partly: bool) -> list[str]:
    """checks: (what, runs, ok(run), show(run)) -> '[met|missed|partly met|n/a] what: run figures; ...'
    ('partly met' only when `partly`: some runs meet it, others do not)."""
    lines = []
    for what, runs, ok, show in checks:
        oks = [ok(r) for r in runs]
        status = ("n/a" if not runs else "met" if all(oks) else
                  "partly met" if partly and any(oks) else "missed")
        lines.append(f"[{status}] {what}: " + ("; ".join(f"{r['name']} {show(r)}" + ("" if o else " (missed)")
                                                         for r, o in zip(runs, oks)) or "no such run"))
    return lines


def targets(rows: list[dict]) -> list[str]:
    """One line per target of issue #9: met / missed / n/a, with the numbers of every run concerned.
    The codebook, probe and ABX targets are the paper's claims about VQ-VAE latents."""
    num, lat, mfcc, bound = _num, _lat, _mfcc, _speaker_bound
    vq = [r for r in rows if r["bottleneck"] == "vqvae"]
    checks = [
        (f"conditioning gain clearly positive (final >= {CONDITIONING_GAIN_MIN} nats/sample) and rising "
         f"(final > mid-run)",
         rows, lambda r: _cmp(r["gain"], CONDITIONING_GAIN_MIN) and _cmp(r["gain"], r["gain_mid"], strict=True),
         lambda r: f"{num(r['gain'])} (mid-run {num(r['gain_mid'])})"),
        ("vqvae codebook perplexity >= n_codes / 4", vq, lambda r: _cmp(r["perplexity"], r["n_codes"] / 4),
         lambda r: f"{num(r['perplexity'], '.1f')} (n_codes / 4 = {r['n_codes'] / 4:g})"),
        ("vqvae phone probe on latents >= on MFCCs", vq, lambda r: _cmp(lat(r, "phone"), mfcc(r, "phone")),
         lambda r: f"{num(lat(r, 'phone'))} vs {num(mfcc(r, 'phone'))}"),
        ("vqvae speaker probe on latents well below MFCCs' (at most midway from chance to MFCCs')", vq,
         lambda r: _cmp(bound(r), lat(r, "speaker")),
         lambda r: f"{num(lat(r, 'speaker'))} vs {num(mfcc(r, 'speaker'))} (bound {num(bound(r))})"),
    ] + [(f"vqvae ABX error {c} speakers on latents below MFCCs'", vq,
          lambda r, k=f"abx_{c}": _cmp(mfcc(r, k), lat(r, k), strict=True),
          lambda r, k=f"abx_{c}": f"{num(lat(r, k), '.1f')}% vs {num(mfcc(r, k), '.1f')}%")
         for c in ("within", "across")]
    return _target_lines(checks, partly=False)


def targets_20(rows: list[dict]) -> list[str]:
    """One line per target of issue #20 (met / missed / n/a), per vqvae run (the speaker gain, voice
    conversion and conditioning-gain targets for every run)."""
    num, lat, mfcc, bound = _num, _lat, _mfcc, _speaker_bound
    vq = [r for r in rows if r["bottleneck"] == "vqvae"]
    checks = [
        ("vqvae phone probe on latents >= on MFCCs", vq, lambda r: _cmp(lat(r, "phone"), mfcc(r, "phone")),
         lambda r: f"{num(lat(r, 'phone'))} vs {num(mfcc(r, 'phone'))}"),
        ("vqvae ABX error across speakers on latents below MFCCs'", vq,
         lambda r: _cmp(mfcc(r, "abx_across"), lat(r, "abx_across"), strict=True),
         lambda r: f"{num(lat(r, 'abx_across'), '.1f')}% vs {num(mfcc(r, 'abx_across'), '.1f')}%"),
        ("vqvae speaker probe on latents at most midway from chance to MFCCs'", vq,
         lambda r: _cmp(bound(r), lat(r, "speaker")),
         lambda r: f"{num(lat(r, 'speaker'))} vs {num(mfcc(r, 'speaker'))} (bound {num(bound(r))})"),
        (f"voice conversion judged as the target speaker on >= {VC_TARGET:.0%} of frames", rows,
         lambda r: _cmp(r["vc_target"], VC_TARGET), lambda r: num(r["vc_target"], ".2f")),
        (f"speaker gain >= {SPEAKER_GAIN_TARGET} nats/sample", rows,
         lambda r: _cmp(r["speaker_gain"], SPEAKER_GAIN_TARGET), lambda r: num(r["speaker_gain"])),
        ("conditioning gain does not decline over the last half of training (final >= mid-run)", rows,
         lambda r: _cmp(r["gain"], r["gain_mid"]), lambda r: f"{num(r['gain'])} (mid-run {num(r['gain_mid'])})"),
    ]
    return _target_lines(checks, partly=True)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        steps, gains, ces = zip(*r["validation"]) if r["validation"] else ((), (), ())
        ax[0].plot(steps, gains, "o-", label=r["name"])
        ax[1].plot(steps, ces, "o-", label=r["name"])
    ax[0].axhline(CONDITIONING_GAIN_MIN, color="gray", ls=":", lw=1)
    ax[0].set(xlabel="step", ylabel="nats / sample", title="conditioning gain (shuffled - true latents)")
    ax[1].set(xlabel="step", ylabel="nats / sample", title="validation cross-entropy")
    for a in ax:
        a.grid(alpha=0.3)
        if rows:
            a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def finished_runs(out: Path, at_step: int | None = None) -> list[Path]:
    """Every evaluated run directory under `out` (config.json and a report: the final one, or with
    `at_step` one made at that step), by name."""
    return sorted(d for d in out.iterdir() if (d / "config.json").is_file() and report_at(d, at_step))


def parse_variants(names: str, extra: list[str]) -> list[tuple[str | None, list[str]]]:
    """[(variant name or None, --set list)]: --variants picks from VARIANTS, --variant NAME=K=V,K=V adds
    (or redefines) one; neither: one unnamed baseline (the runs' names stay B-seedS)."""
    table = dict(VARIANTS)
    chosen = [n for n in names.split(",") if n] if names else []
    for item in extra:
        name, sep, sets = item.partition("=")
        if not sep or not name or "-" in name:
            raise SystemExit(f"error: --variant expects NAME=KEY=VAL,KEY=VAL (NAME without '-'), got {item!r}")
        table[name] = [kv for kv in sets.split(",") if kv]
        if name not in chosen:
            chosen.append(name)
    unknown = [n for n in chosen if n not in table]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}; built in: {sorted(VARIANTS)}")
    return [(n, table[n]) for n in chosen] or [(None, [])]


def plot_tracking(rows: list[dict], out: Path) -> None:
    """Speaker gain and the validation probes (phone, speaker; latents) against the step, one line per
    run; the MFCC probes' accuracies (constant) dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    nan = lambda v: float("nan") if v is None else v
    for r in rows:
        if not r["tracking"]:
            continue
        steps, *series = zip(*r["tracking"])
        for a, ys in zip(ax, series):
            a.plot(steps, [nan(y) for y in ys], "o-", ms=3, label=r["name"])
    ax[0].axhline(SPEAKER_GAIN_TARGET, color="gray", ls=":", lw=1)
    for a, k in ((ax[1], "phone"), (ax[2], "speaker")):
        for r in rows[:1]:
            if r["probe_mfcc_valid"][k] is not None:
                a.axhline(r["probe_mfcc_valid"][k], color="gray", ls=":", lw=1, label="MFCC")
    ax[0].set(xlabel="step", ylabel="nats / sample", title="speaker gain (other - true speaker)")
    ax[1].set(xlabel="step", ylabel="frame accuracy", title="phone probe on latents (validation files)")
    ax[2].set(xlabel="step", ylabel="frame accuracy", title="speaker probe on latents (validation files)")
    for a in ax:
        a.grid(alpha=0.3)
        if rows:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--bottlenecks", default="ae,vae,vqvae")
    ap.add_argument("--variants", default="", help=f"comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VAL,KEY=VAL",
                    help="an extra (or redefined) variant: --set values for its runs")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, help="default: 3000 for tiny, the preset's max_steps otherwise")
    ap.add_argument("--track", default="", help="fractions of --steps at which to evaluate too, e.g. 0.5")
    ap.add_argument("--n-resynth", type=int, default=0,
                    help="held-out files each evaluation resynthesises and converts (the VC verdict)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of each file to resynthesise")
    ap.add_argument("--out", default="runs/representation")
    ap.add_argument("--all-runs", action="store_true",
                    help="tabulate every evaluated run under --out, not only this command's (e.g. the "
                         "screening's variants with the seeds added later for some)")
    ap.add_argument("--table-only", action="store_true",
                    help="train and evaluate nothing: tabulate the evaluated runs under --out (--all-runs)")
    ap.add_argument("--at-step", type=int, metavar="K",
                    help="tabulate the runs as they stood at step K (their report made there: the final one "
                         "or a --track one; validation records up to K), e.g. a screening's budget")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--parallel", type=int, default=2, help="runs side by side")
    a = ap.parse_args(argv)
    steps = a.steps or DEFAULT_STEPS.get(a.preset) or preset(a.preset).train.max_steps
    track = tuple(float(f) for f in a.track.split(",") if f)
    variants = parse_variants(a.variants, a.variant)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [] if a.table_only else [(v, sets, b, int(s)) for v, sets in variants
                                    for b in a.bottlenecks.split(",") for s in a.seeds.split(",")]
    a.all_runs |= a.table_only
    if a.at_step:
        steps = a.at_step
    if a.all_runs:                  # name every variant the tabulated runs use
        variants = [(v, VARIANTS[v]) for v in VARIANTS if any(d.name.startswith(f"{v}-") for d in out.iterdir())]
        variants = variants or [(None, [])]
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        codes = list(pool.map(lambda j: run_one(out, *j, steps, a.threads, a.preset, track, a.n_resynth,
                                                a.seconds), jobs))
    rows = ([summarize(d, a.at_step) for d in finished_runs(out, a.at_step)] if a.all_runs else
            [summarize(out / run_name(v, b, s), a.at_step) for (v, _, b, s), rc in zip(jobs, codes) if rc == 0])
    ablation = variants != [(None, [])] or track or a.n_resynth or a.all_runs
    text = "\n".join([f"# Representation experiment: {a.preset} preset, {steps} steps, demo corpus", "",
                      markdown_table(rows, COLUMNS_20 if ablation else COLUMNS), "",
                      "Final validation numbers from log.jsonl (mid = the validation nearest half-way); probes "
                      "(frame accuracy) and ABX error (%) on the evaluation report's files (wavenet_ae.evaluate). "
                      "Latents / MFCC in each pair." + (" Variants: " + "; ".join(
                          f"{v} = {' '.join(sets) or '(preset)'}" for v, sets in variants if v) if variants[0][0]
                                                       else ""), "",
                      "## Targets (issue #9)", "", *(f"- {t}" for t in targets(rows)), "",
                      "## Targets (issue #20)", "", *(f"- {t}" for t in targets_20(rows)), ""])
    print(text)
    tag = f"-step{a.at_step}" if a.at_step else ""          # a screening's table beside the final one
    md, gain_png, track_png = (out / f"representation{tag}.md", out / f"conditioning_gain{tag}.png",
                               out / f"tracking{tag}.png")
    md.write_text(text)
    plot(rows, gain_png)
    plot_tracking(rows, track_png)
    print(f"written: {md}, {gain_png}, {track_png}", file=sys.stderr)
    return 0 if all(rc == 0 for rc in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
