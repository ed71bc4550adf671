"""Data path speed: can the loader feed the model? Loader batches/s and host ms per batch, next to the
model's step time on the same batches, measured in the same run.

    python benchmarks/data_speed.py [--presets tiny,paper] [--loaders inline,thread,process]
                                    [--files 48] [--file-seconds 8] [--batches 200] [--device cpu|cuda]
                                    [--step-repeat 3] [--json] [--json-out PATH] [--check-args]

The corpus is made in a temporary folder: `--files` FLAC files of `--file-seconds` of speech-like
noise at 16 kHz, 8 speakers. Per preset and loader:
  batches_per_s     batches the training loop receives per second when it does nothing else;
  host_ms_per_batch what one batch costs the training process's thread: the whole loader work with
                    `inline` (decoding, cutting windows: one core), only the hand-over with a prefetch
                    thread or a loader process (their work runs beside the model's step);
  features_ms       MFCC + deltas and mu-law of the batch on --device (part of the step since the
                    loader ships raw windows);
  model_step_ms     forward + backward + Adam on --device for that batch (features included).
The target of the scale issue: host work <= 1 ms per paper batch on one core (`inline` row), i.e.
>= 10x the demand of a 10 ms GPU step. `demand_x` = model_step_ms / host_ms_per_batch: how many times
faster than the model the loader delivers.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from common import add_run_args, environment, format_table, synchronize

from wavenet_ae.config import preset
from wavenet_ae.data.corpus import index_corpus
from wavenet_ae.data.slice_buffer import SliceBuffer
from wavenet_ae.model import WaveNetAE
from wavenet_ae.train import make_optimizer

SR = 16000
LOADERS = {"inline": dict(prefetch=0), "thread": dict(prefetch=8, loader="thread"),
           "process": dict(prefetch=8, loader="process")}


def make_corpus(root: Path, n_files: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_files):
        d = root / f"spk{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        n = int(seconds * SR)
        t = np.arange(n) / SR
        wav = 0.3 * np.sin(2 * np.pi * (120 + 10 * (i % 8)) * t) * (1 + np.sin(2 * np.pi * 3 * t))
        wav += 0.05 * rng.standard_normal(n)
        sf.write(d / f"u{i:04d}.flac", np.clip(wav, -1, 1).astype(np.float32), SR)
    return root


def loader_rate(corpus, cfg, p, kind: str, n_batches: int) -> tuple[float, float]:
    """(batches/s, host ms per batch) over n_batches after the first (start-up, first chunk)."""
    buf = SliceBuffer(corpus, cfg.model, p, cfg.data.n_batch, cfg.data.buffer_seconds, cfg.data.fraction,
                      seed=0, **LOADERS[kind])
    try:
        next(buf)
        host = 0.0
        t0 = time.perf_counter()
        for _ in range(n_batches):
            c0 = time.thread_time()
            next(buf)
            host += time.thread_time() - c0
        wall = time.perf_counter() - t0
    finally:
        buf.close()
    return n_batches / wall, 1e3 * host / n_batches


def step_times(corpus, cfg, p, device: str, repeat: int) -> tuple[float, float]:
    """(features ms, full step ms) on one batch, best of `repeat` after a warm-up."""
    buf = SliceBuffer(corpus, cfg.model, p, cfg.data.n_batch, cfg.data.buffer_seconds, cfg.data.fraction,
                      seed=0, prefetch=0)
    batch = next(buf)
    model = WaveNetAE(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    feats, _, _ = batch.to(device)
    model.encoder.set_feature_stats(feats.mean((0, 2)).cpu(), feats.std((0, 2)).cpu())

    def features():
        batch.to(device)
        synchronize(device)

    def step():
        feats, dec_q, spk = batch.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            h, terms = model(feats, dec_q, spk, head=False)
            loss, _ = model.loss_from(h, terms, dec_q)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        synchronize(device)

    out = []
    for fn, n in ((features, max(repeat, 5)), (step, repeat)):
        fn()
        best = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out.append(1e3 * best)
    buf.close()
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,paper")
    ap.add_argument("--loaders", default="inline,thread,process")
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--file-seconds", type=float, default=8.0)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--step-repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    add_run_args(ap, "preset")
    a = ap.parse_args(argv)
    presets, loaders = a.presets.split(","), a.loaders.split(",")
    bad = [x for x in presets if x not in ("tiny", "paper")] + [x for x in loaders if x not in LOADERS]
    if bad:
        ap.error(f"unknown preset/loader: {', '.join(bad)} (presets: tiny, paper; loaders: {', '.join(LOADERS)})")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if a.check_args:
        print(json.dumps(vars(a)))
        return 0
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        root = make_corpus(Path(tmp) / "corpus", a.files, a.file_seconds)
        for name in presets:
            try:
                cfg = preset(name)
                p = WaveNetAE(cfg.model).plan(cfg.data.n_win)
                corpus = index_corpus(root, SR, p.total_len)
                feat_ms, step_ms = step_times(corpus, cfg, p, a.device, a.step_repeat)
                for kind in loaders:
                    rate, host = loader_rate(corpus, cfg, p, kind, a.batches)
                    rows.append({"preset": name, "loader": kind, "workers": int(kind == "process"),
                                 "n_batch": cfg.data.n_batch, "batches_per_s": rate, "host_ms_per_batch": host,
                                 "features_ms": feat_ms, "model_step_ms": step_ms,
                                 "demand_x": step_ms / host if host > 0 else None})
            except Exception as e:  # noqa: BLE001
                if not a.keep_going:
                    raise
                failed = True
                rows.append({"preset": name, "error": f"{type(e).__name__}: {e}"})
    doc = {"environment": environment(), "device": a.device, "rows": rows}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(doc, indent=1))
    if a.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"device {a.device}; torch threads {torch.get_num_threads()}; cpu {doc['environment']['cpu']}")
        print(format_table(rows, [("preset", "preset"), ("loader", "loader"), ("n_batch", "B"),
                                  ("batches_per_s", "batches/s"), ("host_ms_per_batch", "host ms/batch"),
                                  ("features_ms", "features ms"), ("model_step_ms", "step ms"),
                                  ("demand_x", "x step")]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
