"""Atomic, verifiable checkpoints: `DIR/checkpoints/step-NNNNNNNN.pt`.

A file is `MAGIC + sha256(payload) + payload`, payload = `torch.save` of a dict of tensors and plain
Python values (loadable with `weights_only=True`). Writing goes to a temporary file in the same
directory, which is flushed, fsync'ed and renamed over the target, then the directory is fsync'ed;
older checkpoints are pruned only after that. A truncated or corrupt file fails the hash check on
load and the loader falls back to the previous checkpoint with a warning.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import time
import warnings
from pathlib import Path

import torch

MAGIC = b"WAVENET_AE_CKPT1\n"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of complete-looking checkpoint files, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / n) for n in os.listdir(d) if (m := _NAME.match(n))]
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    target = d / f"step-{step:08d}.pt"
    tmp = d / f".{target.name}.tmp-{os.getpid()}"
    delay = float(os.environ.get("WAVENET_AE_TEST_CKPT_DELAY", "0"))   # lets tests kill mid-write
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + hashlib.sha256(payload).digest())
        half = len(payload) // 2
        fh.write(payload[:half])
        if delay:
            fh.flush()
            time.sleep(delay)
        fh.write(payload[half:])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(d)
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in d.glob(".step-*.tmp-*"):           # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return target


def load_file(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    data = path.read_bytes()
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a wavenet_ae checkpoint (bad header)")
    digest, payload = data[len(MAGIC):head], data[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: corrupt or truncated (checksum mismatch)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def load_latest(run_dir: str | Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_file(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint")
    return None
