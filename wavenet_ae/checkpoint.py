"""Atomic, verifiable checkpoints: `DIR/checkpoints/step-NNNNNNNN.pt`.

A file is `MAGIC + sha256(payload) + payload`, payload = `torch.save` of a dict of tensors and plain
Python values (loadable with `weights_only=True`). Writing goes to a temporary file in the same
directory, which is flushed, fsync'ed and renamed over the target, then the directory is fsync'ed;
older checkpoints are pruned only after that, and only ones that verify: a damaged file is never
deleted by pruning nor counted towards `keep` (it is left for inspection, with a warning). A
truncated or corrupt file fails the hash check on load and the loader falls back to the previous
checkpoint with a warning; if checkpoint files exist but none verifies, loading is a
`CheckpointError` (never a silent restart from step 0).

`list_checkpoints` and `newest_loadable` are the one listing and the one newest-that-loads of the
package (`run_dir.load_run` uses them too); what `newest_loadable` returns has been through `upgrade`,
the one place that knows older layouts of the state dict. `rng_state` / `set_rng_state` are the RNG
part of that state.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MAGIC = b"WAVENET_AE_CKPT1\n"
_NAME = re.compile(r"^step-(\d+)\.pt$")
_HEAD = len(MAGIC) + 32

_warned_damaged: set[Path] = set()      # damaged files save() has already warned about (warn once)

# Layout version of the training state dict, stored as state["format"]; absent = 0. `upgrade` brings
# an older one to this; bump it with every migration added there.
FORMAT = 1


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the `step-NNNNNNNN.pt` files (temporary files of an interrupted save are not
    listed), oldest first. Whether they verify is not checked here."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / n) for n in os.listdir(d) if (m := _NAME.match(n)) and (d / n).is_file()]
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: str | Path) -> bool:
    """Whether `path` is a complete wavenet_ae checkpoint whose payload matches its sha256 (the file is
    read in chunks; nothing is unpickled)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
            if len(head) < _HEAD or not head.startswith(MAGIC):
                return False
            h = hashlib.sha256()
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError:
        return False
    return h.digest() == head[len(MAGIC):]


def _prune(d: Path, new_step: int, keep: int) -> None:
    """Delete verified checkpoints older than the one just written (`new_step`, verified by construction)
    beyond the newest `keep` verified ones. Walks newest to oldest; files newer than `new_step` are left
    alone unread; damaged files are kept, uncounted, and reported once."""
    good, damaged = 1, []
    for step, path in reversed(list_checkpoints(d.parent)):
        if step >= new_step:
            continue
        if not verify(path):
            damaged.append(path)
        elif good < keep:
            good += 1
        else:
            path.unlink(missing_ok=True)
    new = [p for p in damaged if p not in _warned_damaged]
    if new:
        _warned_damaged.update(new)
        warnings.warn(f"{len(damaged)} damaged checkpoint file(s) in {d} fail their checksum and are kept "
                      f"for inspection (not pruned, not counted towards keep={keep}): "
                      f"{', '.join(p.name for p in sorted(damaged))}")


def atomic_write(path: str | Path, parts: bytes | list[bytes], pause: float = 0.0) -> None:
    """Write `path` so that it is either the old file or the complete new one: a temporary file in
    the same directory (`.NAME.tmp-PID`), flushed, fsync'ed and renamed over it, then the directory
    fsync'ed. `pause` seconds between the parts: a test hook for killing a process mid-write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        for i, part in enumerate([parts] if isinstance(parts, bytes) else parts):
            if i and pause:
                fh.flush()
                time.sleep(pause)
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save(run_dir: str | Path, step: int, state: dict, keep: int = 3) -> Path:
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    target = d / f"step-{step:08d}.pt"
    half = len(payload) // 2
    delay = float(os.environ.get("WAVENET_AE_TEST_CKPT_DELAY", "0"))   # lets tests kill mid-write
    atomic_write(target, [MAGIC + hashlib.sha256(payload).digest() + payload[:half], payload[half:]], delay)
    if keep > 0:
        _prune(d, step, keep)
    for stale in d.glob(".step-*.tmp-*"):           # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    return target


def to_cpu(obj):
    """A copy of `obj` (nested dicts / lists / tuples of tensors and plain values) whose tensors are new
    CPU tensors: what a background write serialises while training goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class BackgroundSaver:
    """`save` from a CPU copy of the state on a background thread: the training loop waits only for
    the copy, not for serialising, hashing, writing, fsync and pruning (seconds for the paper preset).
    One write at a time: `submit` first waits for the previous one. A failed write is raised (as a
    CheckpointError) by the next `submit` or by `wait`, which the loop calls before it exits. The
    file is as atomic as with `save`: a process killed mid-write leaves the previous checkpoint."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, run_dir: str | Path, step: int, state: dict, keep: int = 3) -> None:
        self.wait()
        snapshot = to_cpu(state)

        def work():
            try:
                save(run_dir, step, snapshot, keep)
            except BaseException as e:  # noqa: BLE001 - handed to the training loop
                self._error = e
        self._thread = threading.Thread(target=work, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {type(e).__name__}: {e}") from e


def load_file(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _HEAD or not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a wavenet_ae checkpoint (bad header)")
    digest, payload = data[len(MAGIC):_HEAD], data[_HEAD:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: corrupt or truncated (checksum mismatch)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def newest_loadable(run_dir: str | Path, load: Callable[[Path], dict] | None = None,
                    warn_category: type[Warning] = UserWarning) -> tuple[int, Path, dict] | None:
    """(step, path, state) of the newest checkpoint that `load` (default: `load_file`) reads, the state
    `upgrade`d to the current format; a file `load` rejects with `CheckpointError` is reported with a
    warning and the previous one tried.

    None when there is no checkpoint file at all (a fresh run). A `CheckpointError` when there are
    checkpoint files but none of them loads: silently starting over would throw the run away."""
    load = load or load_file
    found = list_checkpoints(run_dir)
    errors = []
    for i in range(len(found) - 1, -1, -1):
        step, path = found[i]
        try:
            state = load(path)
        except CheckpointError as e:
            errors.append(e)
            then = (f"falling back to the previous checkpoint {found[i - 1][1].name}" if i > 0
                    else "no earlier checkpoint")
            warnings.warn(f"{e}; {then}", warn_category, stacklevel=2)
            continue
        # outside the try: a format newer than this code is an error, not a reason to fall back
        return step, path, upgrade(state) if isinstance(state, dict) else state
    if not found:
        return None
    d = checkpoint_dir(run_dir)
    why = "; ".join(" ".join(str(e).replace(f"{d}{os.sep}", "").split()) for e in errors)
    n = len(found)
    raise CheckpointError(f"none of the {n} checkpoint{'s' * (n != 1)} in {d} verifies ({why}); refusing to "
                          f"start over: to train from step 0, move {d} away (or delete it) or use a new "
                          f"--run-dir")


def load_latest(run_dir: str | Path, map_location="cpu") -> dict | None:
    """The newest checkpoint that verifies, `upgrade`d; corrupt ones are reported and skipped. None if
    there is no checkpoint file; `CheckpointError` if there are some but none verifies."""
    found = newest_loadable(run_dir, lambda p: load_file(p, map_location))
    return None if found is None else found[2]


# --- format migrations -----------------------------------------------------------------------------

def upgrade(state: dict) -> dict:
    """`state` (a checkpoint's dict, changed in place and returned) brought from its `format` (absent:
    0) to `FORMAT`. A format newer than this code is a `CheckpointError`. Older per-GPU RNG lists are
    read by `set_rng_state` instead: which entry is this rank's depends on the device it resumes on."""
    version = state.get("format", 0)
    if version > FORMAT:
        raise CheckpointError(f"checkpoint format {version} is newer than this wavenet_ae reads ({FORMAT}): "
                              f"update wavenet_ae")
    if version < 1:
        # format 0 optimizers said fused=None: the same Adam as make_optimizer's fused one, in its
        # slower loop; resuming takes the fused kernel
        for group in state.get("optimizer", {}).get("param_groups", []):
            if group.get("fused") is None:
                group["fused"] = True
        model = state.get("model", {})
        for key in [k for k in model if k == "codebook" or k.endswith(".codebook")]:
            add_vq_step_count(model, key[:-len("codebook")])
    state["format"] = FORMAT
    return state


def add_vq_step_count(model_state: dict, prefix: str) -> None:
    """A VQ bottleneck's state (keys under `prefix`) from before the VQ warm-up has no `steps_seen`:
    those configs had no warm-up, so 0. Also called by `VQBottleneck` on a state dict loaded directly."""
    model_state.setdefault(prefix + "steps_seen", torch.zeros((), dtype=torch.long))


# --- RNG state -------------------------------------------------------------------------------------

def rng_state(device: str = "cpu") -> dict:
    """Every generator this rank draws from: CPU torch, numpy, Python, and its own GPU's (only that
    one: a resumed process may see fewer GPUs than the one that saved)."""
    py = random.getstate()
    np_state = np.random.get_state()
    dev = torch.device(device)
    return {"torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(s: dict, device: str = "cpu") -> None:
    torch.set_rng_state(s["torch"])
    dev = torch.device(device)
    if s["cuda"] and dev.type == "cuda":
        # one state: this rank's device. Checkpoints before that saved one per visible GPU (from 0):
        # this rank's is at its device index.
        cuda = s["cuda"]
        torch.cuda.set_rng_state(cuda[0] if len(cuda) == 1 else cuda[dev.index or 0], dev)
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
