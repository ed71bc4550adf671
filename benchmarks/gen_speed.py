"""Generation speed: engine x weight dtype x batch x threads x preset.

    python benchmarks/gen_speed.py [--presets tiny,paper] [--batches 1,16,64] [--engines python,cpp,cuda]
                                   [--weights fp32,fp16,bf16] [--threads 1,2] [--seconds 1.0] [--json]
                                   [--json-out PATH] [--check-args] [--keep-going]

Measures `Generator.run` on free-running sampling (no teacher forcing): per-chunk conditioning
(one batched matmul) + the engine's autoregressive loop; packing the weights (once per model) is not
timed; "cond share" is the conditioning matmuls timed alone over the same chunks, over the run's
time (the rest is the engine). Each row is the best of --repeat timed runs (the machine may be
shared). samples/s counts all B streams; "x real time" = samples/s / sample rate (16 kHz). Each row's
ratios are to the `python` engine (the reference, float32) and to the float32 `cpp` engine, both
measured in this run with the same preset, batch and threads. Every weight dtype (--weights; the
python engine runs float32 only) and every thread count (--threads, default 1 and all cores) is a
row: the cpp engine splits a batch's items across threads, and batch 1's products (a team of threads,
one barrier per layer; it needs free cores). The path column names the cpp engine's CPU code path
(cuda: gpu). Decoders are randomly initialised (speed does not depend on the weights). The python
engine runs fewer steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from common import add_run_args, environment, format_table, timeit  # this script's folder: first on sys.path

from wavenet_ae import ops  # the installed package (pip install -e . for the working tree)
from wavenet_ae.config import preset
from wavenet_ae.generate import Generator, available_engines, resolve_weight_dtype
from wavenet_ae.model.decoder import WaveNet


def measure(gen: Generator, dec: WaveNet, B: int, seconds: float, max_steps: int, sample_rate: int,
            repeat: int = 3) -> dict:
    C, E = dec.layers[0].lc_proj.in_channels, dec.layers[0].gc_proj.in_features
    dev = gen.device

    def make(S):
        g0 = torch.Generator().manual_seed(0)
        return (torch.randn(B, C, S, generator=g0).to(dev), torch.randn(B, E, generator=g0).to(dev),
                torch.zeros(B, dtype=torch.int64), torch.rand(B, S, generator=g0))

    probe = make(32)
    t_probe = timeit(lambda: gen.run(*probe[:3], u=probe[3]), repeat=1, warmup=1, device=dev)
    steps = int(min(max_steps, max(64, seconds / max(t_probe / 32, 1e-9))))
    args = make(steps)
    dt = timeit(lambda: gen.run(*args[:3], u=args[3]), repeat=repeat, warmup=0, device=dev)
    sps = B * steps / dt
    # the conditioning alone (Generator.conditioning over the same chunks, into one reused buffer): the
    # share of a run that is not the engine
    lc, gcb, chunk = args[0], args[1] @ gen.packed.gc_proj + gen.packed.cond_bias, gen.default_chunk(B)
    buf = torch.empty(B * min(chunk, steps) * gen.packed.cond_width, device=dev)

    def cond_only():
        for s0 in range(0, steps, chunk):
            n = min(steps, s0 + chunk) - s0
            gen.conditioning(lc[:, :, s0:s0 + n], gcb, buf[:B * n * gen.packed.cond_width].view(B, n, -1))

    dc = timeit(cond_only, repeat=repeat, warmup=1, device=dev)
    return {"steps": steps, "seconds": dt, "samples_per_s": sps, "x_realtime": sps / sample_rate,
            "ms_per_step": 1e3 * dt / steps, "cond_share": dc / dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,paper")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--engines", default=None, help="default: every available engine (python, cpp, cuda)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    ap.add_argument("--seconds", type=float, default=0.7, help="target time per timed run (cpp/cuda)")
    ap.add_argument("--python-seconds", type=float, default=0.5, help="target time per python timed run")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per row; the best is reported")
    ap.add_argument("--weights", default="fp32,fp16,bf16", help="weight dtypes of the cpp and cuda engines")
    ap.add_argument("--cuda-dtypes", dest="weights", help=argparse.SUPPRESS)  # the former name (scripts/gpu_check.py)
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_run_args(ap, "row")
    a = ap.parse_args(argv)

    engines = a.engines.split(",") if a.engines else available_engines()
    cores = os.cpu_count() or 1
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        batches = [int(b) for b in a.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {a.batches!r}: expected comma-separated integers")
    try:
        thread_counts = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, cores})
    except ValueError:
        ap.error(f"--threads {a.threads!r}: expected comma-separated integers")
    for what, got, allowed in (("--engines", engines, ("python", "cpp", "cuda")),
                               ("--weights", a.weights.split(","), tuple(dtypes))):
        bad = [x for x in got if x not in allowed]
        if bad:
            ap.error(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")
    if min(batches) < 1:
        ap.error("--batches must be >= 1")
    for pname in a.presets.split(","):
        try:
            preset(pname)
        except (KeyError, ValueError) as e:
            ap.error(f"--presets: {e}")
    env = environment()
    env["cpp_path"] = ops.wavenet_generate_cpu_path("auto") if ops.has_kernel("wavenet_generate", "cpu") else None
    env["cpp_weights_auto"] = (str(resolve_weight_dtype("auto", "cpp")).replace("torch.", "")
                               if env["cpp_path"] else None)
    if a.check_args:
        # everything but the measuring: a generator of each engine available here, for each preset
        here = available_engines()
        for pname in a.presets.split(","):
            dec = WaveNet(preset(pname).model).eval()
            for engine in (e for e in engines if e in here):
                Generator(dec, engine)
        print(json.dumps({"presets": a.presets.split(","), "batches": batches, "engines": engines,
                          "weights": a.weights.split(","), "threads": thread_counts, "seconds": a.seconds,
                          "repeat": a.repeat,
                          "json_out": a.json_out, "available_here": here}))
        return 0
    rows = []
    for pname in a.presets.split(","):
        m = preset(pname).model
        torch.manual_seed(0)
        dec = WaveNet(m).eval()
        geometry = (f"{len(m.dilations)} layers, res {m.n_res}, gate {2 * m.n_dil}, skip {m.n_skp}, "
                    f"post {m.n_post}, quant {m.n_quant}")
        for B, threads in ((B, t) for B in batches for t in thread_counts):
            torch.set_num_threads(threads)
            ref = ref_cpp = None
            for engine in engines:
                variants = [torch.float32] if engine == "python" else [dtypes[d] for d in a.weights.split(",")]
                for wdt in variants:
                    try:
                        gen = Generator(dec, engine, weight_dtype=wdt)
                        secs = a.python_seconds if engine == "python" else a.seconds
                        r = measure(gen, dec, B, secs, 400 if engine == "python" else 20000, m.sample_rate,
                                    a.repeat)
                    except Exception as e:
                        if not a.keep_going:
                            raise
                        rows.append({"preset": pname, "engine": engine, "batch": B, "threads": threads,
                                     "weights": str(wdt).replace("torch.", ""), "geometry": geometry,
                                     "error": f"{type(e).__name__}: {e}"})
                        print(f"  {pname:5s} {engine:6s} B={B:<3d} {rows[-1]['weights']:8s} FAILED: "
                              f"{rows[-1]['error']}", file=sys.stderr, flush=True)
                        continue
                    row = {"preset": pname, "engine": engine, "batch": B, "threads": threads,
                           "path": gen.cpu_path if engine == "cpp" else ("gpu" if engine == "cuda" else "torch"),
                           "weights": str(wdt).replace("torch.", ""), "geometry": geometry, **r}
                    if engine == "python":
                        ref = r["samples_per_s"]
                    if engine == "cpp" and wdt == torch.float32:
                        ref_cpp = r["samples_per_s"]
                    row["vs_python"] = r["samples_per_s"] / ref if ref else None
                    row["vs_cpp_fp32"] = r["samples_per_s"] / ref_cpp if ref_cpp and engine == "cpp" else None
                    rows.append(row)
                    if not a.json:
                        print(f"  {pname:5s} {engine:6s} B={B:<3d} {row['weights']:8s} {threads} thr: "
                              f"{r['samples_per_s']:10.0f} samples/s", file=sys.stderr, flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    failed = sum(1 for r in rows if "error" in r)
    if a.json:
        print(json.dumps({"environment": env, "rows": rows}, indent=1))
        return 1 if failed else 0
    print(f"CPU: {env['cpu']} ({env['cpu_cores']} cores, SIMD: {' '.join(env['cpu_simd']) or 'none'}); "
          f"cpp engine path: {env['cpp_path']} (runtime dispatch; weights auto: {env['cpp_weights_auto']}); "
          f"torch {env['torch']}; GPU: {env['gpu'] or 'none'}")
    for pname in a.presets.split(","):
        sel = [r for r in rows if r["preset"] == pname]
        print(f"\npreset {pname}: {sel[0]['geometry']}; float32 conditioning/activations")
        print(format_table(sel, [("engine", "engine"), ("path", "path"), ("weights", "weights"),
                                 ("batch", "batch"), ("threads", "threads"), ("steps", "steps"),
                                 ("samples_per_s", "samples/s"), ("x_realtime", "x real time (16 kHz)"),
                                 ("ms_per_step", "ms/step"), ("cond_share", "cond share"),
                                 ("vs_python", "vs python"),
                                 ("vs_cpp_fp32", "vs cpp fp32")]))
    for r in rows:
        if "error" in r:
            print(f"FAILED {r['preset']} {r['engine']} B={r['batch']} {r['weights']}: {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
