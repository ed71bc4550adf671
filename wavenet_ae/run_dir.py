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

A *model file* (`wavenet-ae export`, `wavenet_ae.export`) is the portable alternative: one safetensors
file holding the model's tensors, with the config (JSON), speakers (JSON), step, source checkpoint and
a format tag in its string metadata. `load_model_file` reads it with safetensors' own loader and json
only: nothing on that path unpickles (a `.pt` / pickle file given as a model file is refused, never
opened with torch.load). `load_run` given a file instead of a directory loads it as a model file, so
every verb's `--run-dir` accepts one.
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


class ModelFileError(RunDirError):
    pass


# metadata["format"] of a model file, and the newest metadata["format_version"] this code reads
MODEL_FILE_FORMAT = "wavenet_ae.model"
MODEL_FILE_VERSION = 1


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
    """Model, config and speakers of a run dir, from its latest checkpoint (or of a model file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return load_model_file(run_dir, device)
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


# ---------------------------------------------------------------------------------------------------
# model files (safetensors; no pickle)
# ---------------------------------------------------------------------------------------------------

def _not_safetensors(head: bytes) -> str | None:
    """None for what may be a safetensors file (8 bytes of header length, then the JSON header's
    '{'), else what the file is, for the refusal. Only the message depends on this: nothing on this
    path can unpickle, whatever the file holds."""
    if head[8:9] == b"{":
        return None
    if head.startswith(checkpoint.MAGIC[:8]):
        return "a training checkpoint (a pickle: not loaded, pickles can run code)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive such as torch.save writes (a pickle inside: not loaded, pickles can run code)"
    if head[:1] == b"\x80":
        return "a pickle (not loaded: pickles can run code)"
    return "of an unknown format"


def _metadata(path: Path, meta: dict[str, str] | None) -> tuple[Config, list[str], int]:
    """Config, speakers and step from a model file's metadata, each checked."""
    meta = meta or {}
    fmt = meta.get("format")
    if fmt != MODEL_FILE_FORMAT:
        raise ModelFileError(f"model file {path}: not a wavenet_ae model file (metadata format={fmt!r}, "
                             f"expected {MODEL_FILE_FORMAT!r}; write one with wavenet-ae export)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ModelFileError(f"model file {path}: metadata format_version={meta.get('format_version')!r} "
                             "is not an integer") from None
    if version > MODEL_FILE_VERSION:
        raise ModelFileError(f"model file {path}: format_version {version} is newer than this wavenet_ae "
                             f"reads ({MODEL_FILE_VERSION}); upgrade wavenet_ae")

    def field(key: str):
        if key not in meta:
            raise ModelFileError(f"model file {path}: metadata has no {key!r}")
        try:
            return json.loads(meta[key])
        except json.JSONDecodeError as e:
            raise ModelFileError(f"model file {path}: metadata {key!r} is not valid JSON: {e}") from None

    cfg_dict = field("config")
    try:
        if not isinstance(cfg_dict, dict):
            raise ValueError("not a JSON object")
        cfg = Config.from_dict(cfg_dict)
        cfg.validate()
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"model file {path}: invalid config: {e}") from None
    speakers = field("speakers")
    if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
        raise ModelFileError(f"model file {path}: metadata 'speakers' is not a JSON list of names")
    if len(speakers) > cfg.model.n_speakers:
        raise ModelFileError(f"model file {path}: {len(speakers)} speakers but the config has "
                             f"n_speakers={cfg.model.n_speakers}")
    step = field("step")
    if not isinstance(step, int):
        raise ModelFileError(f"model file {path}: metadata 'step' is not an integer")
    return cfg, speakers, step


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Model, config and speakers of a model file written by `wavenet-ae export`.

    Read with safetensors (safe_open) and json only. Tensors stored in float16 / bfloat16
    (`export --dtype`) are widened to the model's float32. Run.dir is the file's folder and
    Run.checkpoint the file itself."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    with open(path, "rb") as fh:
        kind = _not_safetensors(fh.read(16))
    if kind:
        raise ModelFileError(f"model file {path} is {kind}, not a safetensors model file; write one with: "
                             "wavenet-ae export --run-dir DIR --out model.safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            cfg, speakers, step = _metadata(path, f.metadata())
            model = WaveNetAE(cfg.model)
            want = model.state_dict()
            have = set(f.keys())
            missing, extra = sorted(set(want) - have), sorted(have - set(want))
            if missing or extra:
                raise ModelFileError(f"model file {path} does not fit its config: "
                                     + "; ".join(f"{what} tensors {', '.join(ks[:5])}{' ...' if len(ks) > 5 else ''}"
                                                 for what, ks in (("missing", missing), ("unexpected", extra)) if ks))
            state = {}
            for key, ref in want.items():
                t = f.get_tensor(key)
                if t.shape != ref.shape:
                    raise ModelFileError(f"model file {path}: tensor {key} has shape {tuple(t.shape)}; the config "
                                         f"needs {tuple(ref.shape)}")
                if t.dtype != ref.dtype and not (t.is_floating_point() and ref.is_floating_point()):
                    raise ModelFileError(f"model file {path}: tensor {key} is {t.dtype}; expected {ref.dtype}")
                state[key] = t.to(ref.dtype)
    except SafetensorError as e:
        raise ModelFileError(f"model file {path}: not a valid safetensors file ({e})") from None
    model.load_state_dict(state)
    model.to(device).eval()
    return Run(path.parent, cfg, model, speakers, path, step)
