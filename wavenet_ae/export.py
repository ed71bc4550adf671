"""A portable model file: a run's model as one safetensors file (no pickle).

    wavenet-ae export --run-dir DIR --out model.safetensors [--dtype fp32|fp16|bf16]

The file holds every tensor of the model's state dict (weights and buffers: feature statistics, the
VQ codebook...) and, in the safetensors metadata (a string -> string map):

    format            "wavenet_ae.model"       (run_dir.MODEL_FILE_FORMAT)
    format_version    "1"                      (run_dir.MODEL_FILE_VERSION)
    config            the run's Config as JSON (config.json)
    speakers          JSON list of speaker names, id = index (speakers.json)
    step              training step of the checkpoint, JSON integer
    source            the checkpoint it was exported from ("RUN_NAME/checkpoints/step-NNNNNNNN.pt")
    dtype             storage dtype of the floating tensors: float32 | float16 | bfloat16
    wavenet_ae_version

`wavenet_ae.load("model.safetensors")` and every verb's `--run-dir` read it (`run_dir.load_model_file`).
`--dtype fp16|bf16` halves the file; the tensors are widened back to float32 when loaded, so the model
computes in float32 with weights rounded to 16 bits (outputs close to, not equal to, the run's).
The file is written atomically (a temporary file in the same folder, renamed over the target).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .run_dir import MODEL_FILE_FORMAT, MODEL_FILE_VERSION, Run

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_file_bytes(run: Run, dtype: torch.dtype = torch.float32) -> bytes:
    """The safetensors file of a loaded run: its state dict (floating tensors stored in `dtype`) and
    the metadata above."""
    from safetensors.torch import save

    from . import __version__

    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in run.model.state_dict().items()}
    source = run.checkpoint.name if run.checkpoint.parent.name != "checkpoints" else \
        f"{run.dir.name}/checkpoints/{run.checkpoint.name}"
    meta = {"format": MODEL_FILE_FORMAT, "format_version": str(MODEL_FILE_VERSION),
            "config": run.config.to_json(), "speakers": json.dumps(run.speakers), "step": str(int(run.step)),
            "source": source, "dtype": str(dtype).removeprefix("torch."), "wavenet_ae_version": __version__}
    return save(tensors, metadata=meta)


def export(run: Run, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `run`'s model file to `out` atomically."""
    from .checkpoint import atomic_write
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, model_file_bytes(run, dtype))
    return out


def main(argv: list[str] | None = None) -> int:
    from . import cli
    ap = cli.parser("export", "Write a run's model as a portable safetensors file (no pickle).")
    cli.add_run_dir(ap, help="training run directory (its latest checkpoint is exported), or a model file")
    ap.add_argument("--out", required=True, help="model file to write, e.g. model.safetensors")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                    help="storage precision of the floating tensors (loaded back as float32)")
    a = ap.parse_args(argv)

    from .run_dir import RunDirError, load_run

    out = Path(a.out)
    if out.is_dir():
        cli.fail(ap, f"--out {out} is a directory; give a file name such as {out / 'model.safetensors'}")
    try:
        run = load_run(a.run_dir, "cpu")
    except RunDirError as e:
        cli.fail(ap, str(e))
    try:
        export(run, out, DTYPES[a.dtype])
    except OSError as e:
        cli.fail(ap, f"cannot write {out}: {e}")
    n = sum(t.numel() for t in run.model.state_dict().values())
    print(f"wrote {out}: {n} values ({a.dtype}), {out.stat().st_size / 1e6:.1f} MB, step {run.step}, "
          f"{len(run.speakers)} speakers, from {run.checkpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
