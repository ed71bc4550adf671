"""The console script `wavenet-ae VERB ...` and the argument helpers every verb shares.

    wavenet-ae train|generate|encode|evaluate|rfield|manifest|export [ARGS...]

is the same command as `python -m wavenet_ae.VERB [ARGS...]` (`manifest`: `wavenet_ae.data.manifest`).
Each verb's `main(argv)` builds its parser with `parser(verb, ...)`, so its usage and error lines name
the form it was started with, and takes its common options (`--run-dir`, `--device`, `--engine`,
`--weights`, `--threads`) from the helpers below, so that they read and default the same everywhere.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# verb -> module whose main(argv) runs it
VERBS = {
    "train": "wavenet_ae.train",
    "generate": "wavenet_ae.generate",
    "encode": "wavenet_ae.encode",
    "evaluate": "wavenet_ae.evaluate",
    "rfield": "wavenet_ae.rfield",
    "manifest": "wavenet_ae.data.manifest",
    "export": "wavenet_ae.export",
}
_prog_prefix = "python -m "      # "wavenet-ae " when started through the console script


def prog(verb: str) -> str:
    return f"wavenet-ae {verb}" if _prog_prefix == "wavenet-ae " else f"python -m {VERBS[verb]}"


def parser(verb: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog(verb), description=description)


def fail(ap: argparse.ArgumentParser, msg: str) -> NoReturn:
    """One line on stderr naming the command and the problem; exit status 2 (argparse's)."""
    ap.exit(2, f"{ap.prog}: error: {msg}\n")


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_run_dir(ap: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    ap.add_argument("--run-dir", required=required,
                    help=help or "training run directory (config.json, speakers.json, checkpoints/)")


def add_device(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="default: cuda when a CUDA device is available, else cpu")


def resolve_device(ap: argparse.ArgumentParser, device: str | None) -> str:
    """--device as given (cuda checked), or the default."""
    import torch
    if device is None:
        return default_device()
    if device == "cuda" and not torch.cuda.is_available():
        fail(ap, "--device cuda but no CUDA device is available")
    return device


def add_generation(ap: argparse.ArgumentParser) -> None:
    """--engine, --weights, --threads: how autoregressive generation runs."""
    from .generate import ENGINES, WEIGHT_DTYPES
    ap.add_argument("--engine", default="auto", choices=("auto",) + ENGINES, help="auto picks cuda > cpp > python")
    ap.add_argument("--weights", default="auto", choices=("auto",) + tuple(WEIGHT_DTYPES),
                    help="precision of the engine's weight matrices (float32 accumulation); auto: fp16 for "
                         "the cpp engine on AVX2/F16C CPUs, else fp32")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    global _prog_prefix
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: wavenet-ae {{{','.join(VERBS)}}} [ARGS...]\n"
             "       wavenet-ae VERB --help   (the same as python -m wavenet_ae.VERB --help)\n")
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"wavenet-ae {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        sys.stderr.write(usage + f"wavenet-ae: error: unknown verb {verb!r}\n")
        return 2
    _prog_prefix = "wavenet-ae "
    code = importlib.import_module(VERBS[verb]).main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
