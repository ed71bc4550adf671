"""Representation experiment (issue #9): what do the latents of each bottleneck carry?

    python benchmarks/representation.py [--bottlenecks ae,vae,vqvae] [--seeds 0] [--steps 3000]
                                        [--out runs/representation] [--threads 1] [--parallel 2]

For each bottleneck B and seed S it trains on the bundled demo corpus with exactly

    python -m wavenet_ae.train --run-dir OUT/B-seedS --preset tiny --seed S --max-steps STEPS \
        --set bottleneck=B validate_every=250

(a finished run is a no-op, an interrupted one resumes from its last checkpoint), then evaluates it
with `python -m wavenet_ae.evaluate --run-dir OUT/B-seedS --n-resynth 0` (held-out reconstruction,
linear probes, ABX; no resynthesis). --parallel runs go side by side, each with
OMP_NUM_THREADS=--threads; their output is appended to OUT/B-seedS.out.

Prints, and writes to OUT/representation.md, a table of the results and one line per target of the
issue (met / missed, with the numbers); OUT/conditioning_gain.png plots the conditioning gain and the
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

from wavenet_ae.diagnostics import CONDITIONING_GAIN_MIN  # noqa: E402  (training's alert threshold)


def run_one(out: Path, bottleneck: str, seed: int, steps: int, threads: int) -> int:
    """Train (or resume, or find finished) and evaluate one run; returns the first non-zero exit code."""
    name = f"{bottleneck}-seed{seed}"
    run_dir = out / name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    train = [sys.executable, "-m", "wavenet_ae.train", "--run-dir", str(run_dir), "--preset", "tiny",
             "--seed", str(seed), "--max-steps", str(steps), "--set", f"bottleneck={bottleneck}",
             "validate_every=250"]
    evaluate = [sys.executable, "-m", "wavenet_ae.evaluate", "--run-dir", str(run_dir), "--n-resynth", "0"]
    with open(out / f"{name}.out", "a") as log:
        for cmd in (train, evaluate):
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if rc:
                print(f"{name}: `{' '.join(cmd[1:4])}` failed with exit code {rc}; see {log.name}",
                      file=sys.stderr)
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


def summarize(run_dir: Path) -> dict:
    """One table row from the run's config, log and evaluation report."""
    cfg = json.loads((run_dir / "config.json").read_text())
    rep_path = run_dir / "report" / "report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.exists() else {}
    records = read_log(run_dir)
    valid = [r for r in records if r.get("kind") == "valid"]
    last = valid[-1] if valid else {}
    mid = min(valid, key=lambda r: abs(r["step"] - last["step"] / 2)) if len(valid) > 1 else {}
    rec, probes = rep.get("reconstruction", {}), rep.get("probe_accuracy", {})
    abx = rep.get("abx") or {}
    pair = lambda d, a, b: (d.get(a), d.get(b)) if d else None           # (latents, MFCC)
    bottleneck = cfg["model"]["bottleneck"]
    return {
        "name": run_dir.name, "bottleneck": bottleneck, "seed": cfg["train"]["seed"],
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
    }


COLUMNS = [("bottleneck", "bottleneck"), ("seed", "seed"), ("steps", "steps"), ("minutes", "train min"),
           ("valid_ce", "valid CE"), ("gain", "cond. gain"), ("speaker_gain", "speaker gain"),
           ("codebook", "perplexity / codes used"), ("active_dims", "active dims"),
           ("phone", "phone probe lat / MFCC"), ("speaker", "speaker probe lat / MFCC"),
           ("abx_within", "ABX within % lat / MFCC"), ("abx_across", "ABX across % lat / MFCC")]


def _cmp(a, b, strict: bool = False) -> bool:
    """a >= b (a > b if strict); False when either is unknown."""
    return a is not None and b is not None and (a > b if strict else a >= b)


def targets(rows: list[dict]) -> list[str]:
    """One line per target of issue #9: met / missed / n/a, with the numbers of every run concerned.
    The codebook, probe and ABX targets are the paper's claims about VQ-VAE latents."""
    num = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)
    lat = lambda r, k: r[k][0] if r[k] else None
    mfcc = lambda r, k: r[k][1] if r[k] else None
    bound = lambda r: None if mfcc(r, "speaker") is None else (1 / r["n_speakers"] + mfcc(r, "speaker")) / 2
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
    lines = []
    for what, runs, ok, show in checks:
        oks = [ok(r) for r in runs]
        status = "n/a" if not runs else "met" if all(oks) else "missed"
        lines.append(f"[{status}] {what}: " + ("; ".join(f"{r['name']} {show(r)}" + ("" if o else " (missed)")
                                                         for r, o in zip(runs, oks)) or "no such run"))
    return lines


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bottlenecks", default="ae,vae,vqvae")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="runs/representation")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--parallel", type=int, default=2, help="runs side by side")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(b, int(s)) for b in a.bottlenecks.split(",") for s in a.seeds.split(",")]
    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        codes = list(pool.map(lambda j: run_one(out, *j, a.steps, a.threads), jobs))
    rows = [summarize(out / f"{b}-seed{s}") for (b, s), rc in zip(jobs, codes) if rc == 0]
    text = "\n".join([f"# Representation experiment: tiny preset, {a.steps} steps, demo corpus", "",
                      markdown_table(rows, COLUMNS), "",
                      "Final validation numbers from log.jsonl; probes (frame accuracy) and ABX error (%) on the "
                      "evaluation report's files (wavenet_ae.evaluate). Latents / MFCC in each pair.", "",
                      "## Targets (issue #9)", "", *(f"- {t}" for t in targets(rows)), ""])
    print(text)
    (out / "representation.md").write_text(text)
    plot(rows, out / "conditioning_gain.png")
    print(f"written: {out / 'representation.md'}, {out / 'conditioning_gain.png'}", file=sys.stderr)
    return 0 if all(rc == 0 for rc in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
