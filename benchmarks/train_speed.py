"""Training speed and peak memory: fused residual layers vs the PyTorch reference, per device and preset.

    python benchmarks/train_speed.py [--configs cpu:tiny,cpu:paper,cuda:paper:bf16] [--steps N]
                                     [--rounds R] [--json]

A config is device:preset[:dtype][:batch] (dtype float32 or bf16 = CUDA autocast as in training; batch
defaults to the preset's on CUDA and on CPU for `tiny`, 1 for `paper` on CPU). Default: cpu:tiny,
cpu:paper and, when a GPU is visible, cuda:paper:bf16 and cuda:tiny.

One training step as in `wavenet_ae.train`: forward + cross-entropy (+ bottleneck terms), backward,
gradient clipping, Adam update, on fixed random batches (speed does not depend on the data). Each
(config, mode) runs in a fresh subprocess, so peak memory belongs to that run alone:
  CPU   peak RSS of the process (getrusage ru_maxrss) and its growth over the RSS measured just before
        the first step (model, optimizer and batches already allocated): "train MB";
  CUDA  torch.cuda.max_memory_allocated over the timed steps.
The modes alternate over --rounds rounds (reference first in odd rounds, fused first in even ones); a
mode's time is the best of its rounds' median step times (the machine may be shared). The ratio
columns compare fused to the reference of the same config in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

MODES = ("reference", "fused")


def parse_config(text: str) -> dict:
    parts = text.split(":")
    if len(parts) < 2 or parts[0] not in ("cpu", "cuda"):
        raise SystemExit(f"bad config {text!r}: expected device:preset[:dtype][:batch], device cpu|cuda")
    cfg = {"device": parts[0], "preset": parts[1], "dtype": "float32", "batch": None}
    for p in parts[2:]:
        if p in ("float32", "fp32", "bf16", "bfloat16"):
            cfg["dtype"] = "bf16" if p.startswith("bf") else "float32"
        elif p.isdigit():
            cfg["batch"] = int(p)
        else:
            raise SystemExit(f"bad config field {p!r} in {text!r}")
    if cfg["dtype"] == "bf16" and cfg["device"] != "cuda":
        raise SystemExit(f"{text}: bf16 (autocast) is a CUDA setting")
    return cfg


# ---------------------------------------------------------------------------------------------------
# worker: one (config, mode) in this process
# ---------------------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    import torch

    from wavenet_ae import ops
    from wavenet_ae.config import preset
    from wavenet_ae.model import WaveNetAE

    ops.USE_FUSED_RESIDUAL = spec["mode"] == "fused"
    dev = torch.device(spec["device"])
    cfg = preset(spec["preset"])
    B, N = spec["batch"], cfg.data.n_win
    torch.manual_seed(0)
    model = WaveNetAE(cfg.model).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    p, m = model.plan(N), cfg.model
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, m.n_in, p.n_frames, generator=g).to(dev),
                torch.randint(0, m.n_quant, (B, p.dec_len), generator=g).to(dev),
                torch.randint(0, m.n_speakers, (B,), generator=g).to(dev)) for _ in range(2)]
    bf16 = spec["dtype"] == "bf16"
    if ops.USE_FUSED_RESIDUAL and not ops.fused_residual_available(batches[0][0].float()):
        raise SystemExit(f"no fused residual kernel for {spec['device']} in this build of wavenet_ae._C")

    def step(i):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(*batches[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    base = rss_bytes()
    for i in range(spec["warmup"]):
        step(i)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(spec["steps"]):
        t = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    out = {**spec, "n_win": N, "step_s": times[len(times) // 2], "step_min_s": times[0],
           "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        out["train_mb"] = out["peak_mb"] - base / 2**20
    return out


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------

def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None, help="comma-separated device:preset[:dtype][:batch]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 8 for tiny, 3 otherwise)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (reference, fused) runs")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    from common import environment, format_table
    from wavenet_ae import ops
    from wavenet_ae.config import preset

    gpu = torch.cuda.is_available()
    configs = args.configs or ("cpu:tiny,cpu:paper" + (",cuda:paper:bf16,cuda:tiny" if gpu else ""))
    env = environment()
    cap = ops._C.cpu_capability() if ops.HAVE_EXT else "-"
    print(f"# train_speed: {env['cpu']} ({env['cpu_cores']} cores, SIMD {','.join(env['cpu_simd']) or '-'}; "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, wavenet_ae._C compiled for {cap}), "
          f"torch {env['torch']} with {env['torch_threads']} threads, GPU: {env['gpu'] or 'none'}")
    print(f"# fused kernels: CPU {ops.residual_cpu_info() if ops.HAVE_RESIDUAL_KERNELS else 'no'}, "
          f"CUDA {'yes' if ops.HAVE_RESIDUAL_CUDA else 'no'}; rounds={args.rounds}, warmup={args.warmup}")
    rows = []
    t_start = time.time()
    for text in configs.split(","):
        cfg = parse_config(text.strip())
        if cfg["device"] == "cuda" and not gpu:
            print(f"# skipping {text}: no GPU")
            continue
        pcfg = preset(cfg["preset"])
        if cfg["batch"] is None:
            cfg["batch"] = 1 if (cfg["device"] == "cpu" and cfg["preset"] != "tiny") else pcfg.data.n_batch
        steps = args.steps or (8 if cfg["preset"] == "tiny" else 3)
        runs = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                runs[mode].append(run_worker({**cfg, "mode": mode, "steps": steps, "warmup": args.warmup}))
        best = {m: min(runs[m], key=lambda o: o["step_s"]) for m in MODES}
        ref = best["reference"]
        for m in MODES:
            o = dict(best[m])
            o["peak_mb"] = max(x["peak_mb"] for x in runs[m])
            if "train_mb" in o:
                o["train_mb"] = max(x["train_mb"] for x in runs[m])
            o["samples_per_s"] = o["batch"] * o["n_win"] / o["step_s"]
            o["speedup"] = ref["step_s"] / o["step_s"]
            o["mem_ratio"] = o["peak_mb"] / max(x["peak_mb"] for x in runs["reference"])
            o["config"] = text.strip()
            rows.append(o)
    cols = [("device", "device"), ("preset", "preset"), ("dtype", "dtype"), ("batch", "B"), ("n_win", "N"),
            ("threads", "threads"), ("mode", "mode"), ("step_s", "s/step"), ("samples_per_s", "samples/s"),
            ("speedup", "x ref"), ("peak_mb", "peak MB"), ("train_mb", "train MB"), ("mem_ratio", "mem / ref")]
    print(format_table(rows, cols))
    print(f"# peak MB: CPU = process max RSS, CUDA = max_memory_allocated; train MB (CPU) = peak RSS - RSS "
          f"before the first step. Total {time.time() - t_start:.0f} s.")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
