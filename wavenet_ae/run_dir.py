"""Read a training run directory for inference (generation, encoding).

A run dir (what `python -m wavenet_ae.train --run-dir DIR` writes) holds

    DIR/config.json                        wavenet_ae.config.Config as JSON
    DIR/speakers.json                      speaker names, id = index
    DIR/checkpoints/step-NNNNNNNN.pt       torch.save dict; key "model" = the model's state_dict

`load_run` takes the latest checkpoint (highest step number; temporary files of an interrupted save are
ignored; one that fails its checksum falls back to the previous one, with a warning; none that loads is
an error) and returns the model in evaluation mode. Listing and newest-that-loads are those of
`wavenet_ae.checkpoint`, which the training loop resumes with. Checkpoints of the training loop (header
+ sha256) and plain `torch.save` dicts are both read, older formats upgraded (`checkpoint.upgrade`).
Every failure is a `RunDirError` whose message names the missing or broken file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .checkpoint import CheckpointError
from .config import Config
from .model import WaveNetAE


class RunDirError(RuntimeError):
    pass


@dataclass
class Run:
    dir: Path
    config: Config
    model: WaveNetAE          # eval mode, on the requested device
    speakers: list[str]       # id -> name
    checkpoint: Path
    step: int

    def speaker_id(self, name: str) -> int:
        try:
            return self.speakers.index(name)
        except ValueError:
            raise KeyError(f"unknown speaker {name!r}; known speakers: {', '.join(self.speakers)}") from None


def _torch_load(path: Path) -> dict:
    """A checkpoint written by the training loop (`wavenet_ae.checkpoint`: magic header + sha256,
    verified) or a plain `torch.save` file. A damaged one is a `CheckpointError` naming the file."""
    with open(path, "rb") as fh:
        head = fh.read(len(checkpoint.MAGIC))
    if head == checkpoint.MAGIC:
        return checkpoint.load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is unreadable: {e}") from e


def _strip_wrappers(state: dict) -> dict:
    """Undo DistributedDataParallel ('module.') and torch.compile ('_orig_mod.') key prefixes."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """Model, config and speakers of a run dir, from its latest checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} does not exist")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise RunDirError(f"{cfg_path} is missing: not a run dir (train one with python -m wavenet_ae.train "
                          f"--run-dir {run_dir})")
    try:
        cfg = Config.from_json(cfg_path.read_text())
        cfg.validate()
    except (ValueError, TypeError) as e:
        raise RunDirError(f"{cfg_path}: invalid config: {e}") from e

    try:                                      # newest that loads; a corrupt one falls back, loudly
        found = checkpoint.newest_loadable(run_dir, _torch_load, warn_category=RuntimeWarning)
    except CheckpointError as e:
        raise RunDirError(str(e)) from e
    if found is None:
        raise RunDirError(f"no checkpoint in {run_dir / 'checkpoints'} (expected step-NNNNNNNN.pt; "
                          f"train first: python -m wavenet_ae.train --run-dir {run_dir})")
    step, ck_path, ck = found
    if not isinstance(ck, dict) or "model" not in ck:
        raise RunDirError(f"checkpoint {ck_path} has no 'model' state dict")

    spk_path = run_dir / "speakers.json"
    if spk_path.is_file():
        try:
            speakers = json.loads(spk_path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{spk_path}: not valid JSON: {e}") from e
    elif isinstance(ck.get("speakers"), list):
        speakers = ck["speakers"]
    else:
        raise RunDirError(f"{spk_path} is missing (a JSON list of speaker names, id = index)")
    if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
        raise RunDirError(f"{spk_path}: expected a JSON list of speaker names")
    if len(speakers) > cfg.model.n_speakers:
        raise RunDirError(f"{spk_path} lists {len(speakers)} speakers but the model has "
                          f"n_speakers={cfg.model.n_speakers}")

    model = WaveNetAE(cfg.model)
    try:
        model.load_state_dict(_strip_wrappers(ck["model"]))
    except RuntimeError as e:
        raise RunDirError(f"checkpoint {ck_path} does not fit {cfg_path}: {e}") from e
    model.to(device).eval()
    return Run(run_dir, cfg, model, speakers, ck_path, step)
