"""Training speed and peak memory: fused decoder kernels vs the PyTorch reference, per device and preset.

    python benchmarks/train_speed.py [--configs cpu:tiny,cpu:paper,cuda:paper:bf16] [--steps N]
                                     [--warmup W] [--threads T] [--json]

A config is device:preset[:dtype][:batch] (dtype float32 or bf16 = CUDA autocast as in training; batch
defaults to the preset's on CUDA and on CPU for `tiny`, 1 for `paper` on CPU). Default: cpu:tiny,
cpu:paper and, when a GPU is visible, cuda:paper:bf16 and cuda:tiny.

One training step as in `wavenet_ae.train`: forward + cross-entropy (+ bottleneck terms), backward,
gradient clipping, Adam update (make_optimizer: fused Adam), with freed memory kept in the process
(malloc.retain_freed_memory), on fixed random batches (speed does not depend on the data).
Modes: reference (PyTorch eager), fused-residual (the fused residual-layer kernels) and fused (those
and the fused output layer + cross-entropy, ops.linear_cross_entropy; a CPU kernel: on CUDA this mode
is fused-residual).
  speed   one process per config runs all modes step by step, alternating (ops.USE_FUSED_RESIDUAL and
          ops.USE_FUSED_OUTPUT_LOSS flipped between steps of the same model), so a busy moment on a
          shared machine hits all modes alike; a mode's time is the median of its steps (min also
          reported in --json);
  memory  each mode in a fresh subprocess of its own (warmup + 2 steps):
          CPU   peak RSS of the process (getrusage ru_maxrss) and its growth over the RSS measured just
                before the first step (model, optimizer and batches already allocated): "train MB";
          CUDA  torch.cuda.max_memory_allocated over the steps after the first.
The ratio columns compare each mode to the reference of the same config in this run.
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

MODES = ("reference", "fused-residual", "fused")
# (ops.USE_FUSED_RESIDUAL, ops.USE_FUSED_OUTPUT_LOSS) of each mode
MODE_FLAGS = {"reference": (False, False), "fused-residual": (True, False), "fused": (True, True)}


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
    """spec["job"] = "time": all modes, alternating step by step; "memory": spec["mode"] alone."""
    import torch

    from wavenet_ae import malloc, ops
    from wavenet_ae.config import preset
    from wavenet_ae.model import WaveNetAE
    from wavenet_ae.train import make_optimizer

    malloc.retain_freed_memory()  # as wavenet_ae.train does
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    cfg = preset(spec["preset"])
    B, N = spec["batch"], cfg.data.n_win
    torch.manual_seed(0)
    model = WaveNetAE(cfg.model).to(dev).train()
    opt = make_optimizer(model, cfg)
    p, m = model.plan(N), cfg.model
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, m.n_in, p.n_frames, generator=g).to(dev),
                torch.randint(0, m.n_quant, (B, p.dec_len), generator=g).to(dev),
                torch.randint(0, m.n_speakers, (B,), generator=g).to(dev)) for _ in range(2)]
    bf16 = spec["dtype"] == "bf16"
    ops.USE_FUSED_RESIDUAL = True
    if not ops.fused_residual_available(batches[0][0].float()):
        raise SystemExit(f"no fused residual kernel for {spec['device']} in this build of wavenet_ae._C")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(i, mode):
        ops.USE_FUSED_RESIDUAL, ops.USE_FUSED_OUTPUT_LOSS = MODE_FLAGS[mode]
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(*batches[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sync()
        return time.perf_counter() - t

    out = {**spec, "n_win": N, "threads": torch.get_num_threads()}
    if spec["job"] == "time":
        times = {mo: [] for mo in MODES}
        for i in range(spec["warmup"] + spec["steps"]):
            for mo in (MODES if i % 2 == 0 else MODES[::-1]):
                t = step(i, mo)
                if i >= spec["warmup"]:
                    times[mo].append(t)
        for mo in MODES:
            ts = sorted(times[mo])
            out[mo] = {"step_s": ts[len(ts) // 2], "step_min_s": ts[0]}
        return out
    base = rss_bytes()
    step(0, spec["mode"])
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(1, 3):
        step(i, spec["mode"])
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
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per mode (default: 10; 4 for paper on CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the runs (default: torch's)")
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
          f"CUDA {'yes' if ops.HAVE_RESIDUAL_CUDA else 'no'}; warmup={args.warmup}")
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
        steps = args.steps or (10 if cfg["preset"] == "tiny" or cfg["device"] == "cuda" else 4)
        common = {**cfg, "warmup": args.warmup, "threads": args.threads}
        timing = run_worker({**common, "job": "time", "steps": steps})
        mem = {mo: run_worker({**common, "job": "memory", "mode": mo}) for mo in MODES}
        ref_s = timing["reference"]["step_s"]
        for mo in MODES:
            o = {**cfg, "mode": mo, "n_win": timing["n_win"], "threads": timing["threads"], **timing[mo],
                 **{k: mem[mo][k] for k in ("peak_mb", "train_mb") if k in mem[mo]}}
            o["samples_per_s"] = o["batch"] * o["n_win"] / o["step_s"]
            o["speedup"] = ref_s / o["step_s"]
            o["mem_ratio"] = o["peak_mb"] / mem["reference"]["peak_mb"]
            o["config"] = text.strip()
            rows.append(o)
    cols = [("device", "device"), ("preset", "preset"), ("dtype", "dtype"), ("batch", "B"), ("n_win", "N"),
            ("threads", "threads"), ("mode", "mode"), ("step_s", "s/step"), ("samples_per_s", "samples/s"),
            ("speedup", "x ref"), ("peak_mb", "peak MB"), ("train_mb", "train MB"), ("mem_ratio", "mem / ref")]
    print(format_table(rows, cols))
    print(f"# s/step: median over steps alternating with the other modes in one process. peak MB (a fresh "
          f"process per mode): CPU = max RSS, CUDA = max_memory_allocated; train MB (CPU) = peak RSS - RSS "
          f"before the first step. Total {time.time() - t_start:.0f} s.")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
