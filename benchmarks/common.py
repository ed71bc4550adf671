"""Shared helpers of the benchmarks: timing, environment description, tables.

Every table names the device, dtype and shapes, and reports the ratio to the reference measured in
the same run (never to a number from another run or machine).
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Sequence

import torch


def synchronize(device: str | torch.device | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], *, repeat: int = 3, warmup: int = 1, device=None) -> float:
    """Best wall-clock seconds of `repeat` calls of fn() after `warmup` untimed calls (the minimum
    is the least noisy estimate on a shared machine)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Machine, CPU SIMD features, threads, torch build, GPU (if any), and the installed wavenet_ae's
    extension: its build_info() (compiled SIMD, the CPU kernels' paths here, CUDA archs), or why it is
    not loaded."""
    from wavenet_ae import ops

    flags = cpu_flags()
    env = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_simd": [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16") if f in flags],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "wavenet_ae_ext": ops.build_info() if ops.HAVE_EXT else f"not loaded: {ops.EXT_IMPORT_ERROR}",
    }
    return env


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts; columns: (key, header). Numbers are right-aligned."""
    cells = [[h for _, h in columns]]
    for r in rows:
        cells.append([_fmt(r.get(k)) for k, _ in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.rjust(w) if n and _is_num(v) else v.ljust(w) for v, w in zip(c, widths)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts; columns: (key, header). Cells formatted as in format_table; a tuple is shown
    as `a / b` (e.g. a measure on latents / on MFCCs)."""
    def cell(v) -> str:
        return " / ".join(_fmt(x) for x in v) if isinstance(v, tuple) else _fmt(v)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def _is_num(s: str) -> bool:
    return s.replace(",", "").replace(".", "").replace("-", "").replace("x", "").isdigit()


def add_run_args(ap, unit: str) -> None:
    """The options every benchmark shares with scripts/gpu_check.py: a JSON copy of the results, an
    argument check that measures nothing, and going on past a failing `unit` (a row, a config)."""
    ap.add_argument("--json-out", default=None, metavar="PATH",
                    help="also write the JSON document (environment and rows) to PATH")
    ap.add_argument("--check-args", action="store_true",
                    help="validate the arguments, print them, and exit without measuring")
    ap.add_argument("--keep-going", action="store_true",
                    help=f"a {unit} that fails is reported with its error and the others still run (exit 1)")
