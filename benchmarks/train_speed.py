"""Training speed and peak memory: fused decoder kernels vs the PyTorch reference, per device and preset.

    python benchmarks/train_speed.py [--configs cpu:tiny,cpu:paper,cuda:paper:bf16] [--steps N]
                                     [--warmup W] [--threads T] [--modes reference,fused-residual,fused]
                                     [--json] [--json-out PATH] [--check-args] [--keep-going]

A config is device:preset[:dtype][:batch] (dtype float32 or bf16 = CUDA autocast as in training; batch
defaults to the preset's on CUDA and on CPU for `tiny`, 1 for `paper` on CPU). Default: cpu:tiny,
cpu:paper and, when a GPU is visible, cuda:paper:bf16 and cuda:tiny.

One training step as in `wavenet_ae.train`: forward + cross-entropy (+ bottleneck terms), backward,
gradient clipping, Adam update (make_optimizer: fused Adam), with freed memory kept in the process
(malloc.retain_freed_memory), on fixed random batches (speed does not depend on the data).
Modes: reference (PyTorch eager), fused-residual (the fused residual-layer kernels) and fused (those
and the fused output layer + cross-entropy, ops.linear_cross_entropy; a CPU kernel: on CUDA this mode
is fused-residual).
  speed   one process per config runs all modes step by step, alternating (ops.USE_FUSED_RESIDUAL_LAYER and
          ops.USE_FUSED_LINEAR_CROSS_ENTROPY flipped between steps of the same model), so a busy moment on a
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

# wavenet_ae is the installed package (pip install -e . for the working tree), never this tree put first
# on sys.path: that would shadow a regular install's extension. common.py comes from this script's
# folder, which Python puts first on sys.path.
ROOT = Path(__file__).resolve().parents[1]

MODES = ("reference", "fused-residual", "fused")
# (ops.USE_FUSED_RESIDUAL_LAYER, ops.USE_FUSED_LINEAR_CROSS_ENTROPY) of each mode
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
    ops.USE_FUSED_RESIDUAL_LAYER = True
    if not ops.fused_residual_layer_available(batches[0][0].float()):
        raise SystemExit(f"no fused residual kernel for {spec['device']} in this build of wavenet_ae._C")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(i, mode):
        ops.USE_FUSED_RESIDUAL_LAYER, ops.USE_FUSED_LINEAR_CROSS_ENTROPY = MODE_FLAGS[mode]
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
        modes = tuple(spec.get("modes") or MODES)
        times = {mo: [] for mo in modes}
        for i in range(spec["warmup"] + spec["steps"]):
            for mo in (modes if i % 2 == 0 else modes[::-1]):
                t = step(i, mo)
                if i >= spec["warmup"]:
                    times[mo].append(t)
        for mo in modes:
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
    from common import add_run_args
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=None, help="comma-separated device:preset[:dtype][:batch]")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per mode (default: 10; 4 for paper on CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the runs (default: torch's)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    add_run_args(ap, "config")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")

    import torch

    from common import environment, format_table
    from wavenet_ae import ops
    from wavenet_ae.config import preset

    gpu = torch.cuda.is_available()
    configs = args.configs or ("cpu:tiny,cpu:paper" + (",cuda:paper:bf16,cuda:tiny" if gpu else ""))
    parsed = [parse_config(text.strip()) for text in configs.split(",")]
    for cfg in parsed:
        try:
            preset(cfg["preset"])
        except ValueError as e:
            ap.error(f"--configs: {e}")
    env = environment()
    info = ops.build_info() if ops.HAVE_EXT else None
    paths = ",".join(f"{k}={v}" for k, v in info["cpu_paths"].items()) if info else "-"
    print(f"# train_speed: {env['cpu']} ({env['cpu_cores']} cores, SIMD {','.join(env['cpu_simd']) or '-'}; "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, wavenet_ae._C CPU paths {paths}), "
          f"torch {env['torch']} with {env['torch_threads']} threads, GPU: {env['gpu'] or 'none'}")
    cpu_info = ops.residual_layer_cpu_info() if ops.has_kernel("residual_layer_fwd", "cpu") else "no"
    cuda_info = "yes" if ops.has_kernel("residual_layer_fwd", "cuda") else "no"
    print(f"# fused kernels: CPU {cpu_info}, CUDA {cuda_info}; warmup={args.warmup}")
    if args.check_args:
        # everything but the measuring: what the worker uses must exist
        from wavenet_ae import malloc  # noqa: F401
        from wavenet_ae.model import WaveNetAE  # noqa: F401
        from wavenet_ae.train import make_optimizer  # noqa: F401
        for name in ("USE_FUSED_RESIDUAL_LAYER", "USE_FUSED_LINEAR_CROSS_ENTROPY", "fused_residual_layer_available"):
            getattr(ops, name)
        print(json.dumps({"configs": parsed, "modes": modes, "steps": args.steps, "warmup": args.warmup,
                          "json_out": args.json_out, "gpu_here": gpu}))
        return 0
    rows, failed = [], []
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
        try:
            timing = run_worker({**common, "job": "time", "steps": steps, "modes": list(modes)})
            mem = {mo: run_worker({**common, "job": "memory", "mode": mo}) for mo in modes}
        except RuntimeError as e:
            if not args.keep_going:
                raise
            failed.append({**cfg, "config": text.strip(), "error": str(e)[-2000:]})
            print(f"# FAILED {text}: {str(e)[-1000:]}", flush=True)
            continue
        ref_s = timing["reference"]["step_s"] if "reference" in modes else None
        for mo in modes:
            o = {**cfg, "mode": mo, "n_win": timing["n_win"], "threads": timing["threads"], **timing[mo],
                 **{k: mem[mo][k] for k in ("peak_mb", "train_mb") if k in mem[mo]}}
            o["samples_per_s"] = o["batch"] * o["n_win"] / o["step_s"]
            o["speedup"] = ref_s / o["step_s"] if ref_s else None
            o["mem_ratio"] = o["peak_mb"] / mem["reference"]["peak_mb"] if "reference" in mem else None
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
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"environment": env, "rows": rows, "failed": failed}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
