"""The Python API: a trained model, loaded once, to encode, resynthesise and convert voices.

    import wavenet_ae
    m = wavenet_ae.load("runs/demo")                # a run dir, or a model file (wavenet-ae export)
    enc = m.encode("in.wav")                        # Encoding(latents (M, n_latent) float32, codes (M,) | None)
    wav = m.resynthesize("in.wav", seed=0)          # (T,) float32 at m.sample_rate
    wav = m.convert("in.wav", speaker="slt")        # voice conversion: another speaker's embedding

Inputs: a path (read, mixed to mono and resampled by `data.corpus.load_audio`), or a 1-D numpy array
or tensor at `m.sample_rate` (or at `sample_rate=`, resampled as load_audio does); a list of inputs
gives a list of results. The results are those of the CLIs (`encode.encode_signal`,
`generate.resynthesize`): the same functions on the same model.

Start-up is paid once: the model is loaded once, and the generation engine's packed weights
(`generate.Generator`) are built on first use for each (engine, weight dtype) and kept.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

from . import encode as _encode
from . import generate as _generate
from .config import Config
from .run_dir import Run, load_run

Audio = Union[str, Path, np.ndarray, torch.Tensor]


class Encoding(NamedTuple):
    """What `Model.encode` returns for one signal. Latent m describes the wav segment
    [m * hop, (m + 1) * hop) (hop = 320 samples, 20 ms at 16 kHz), M = ceil(T / hop)."""
    latents: np.ndarray          # (M, n_latent) float32: VQ-VAE quantised vectors, VAE means, AE outputs
    codes: np.ndarray | None     # (M,) int64 code indices for a VQ-VAE, else None


class Model:
    """A loaded model (`load`). Attributes: `config` (Config), `speakers` (names, id = index),
    `sample_rate`, `step`, `model` (the torch module, eval mode), `device`, `run` (run_dir.Run)."""

    def __init__(self, run: Run, device: str | torch.device, engine: str = "auto", weights: str = "auto"):
        self.run = run
        self.device = torch.device(device)
        self.engine, self.weights = engine, weights
        self._generators: dict[tuple[str, torch.dtype], _generate.Generator] = {}

    # --- what was loaded ----------------------------------------------------------------------------
    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def model(self) -> torch.nn.Module:
        return self.run.model

    @property
    def speakers(self) -> list[str]:
        return list(self.run.speakers)

    @property
    def sample_rate(self) -> int:
        return self.run.config.model.sample_rate

    @property
    def step(self) -> int:
        return self.run.step

    def __repr__(self) -> str:
        m = self.config.model
        return (f"wavenet_ae.Model({str(self.run.checkpoint)!r}, step={self.step}, {m.bottleneck}, "
                f"n_latent={m.n_latent}, {len(self.speakers)} speakers, device={self.device})")

    # --- inputs -------------------------------------------------------------------------------------
    def audio(self, x: Audio, sample_rate: int | None = None) -> np.ndarray:
        """One input as (T,) float32 at the model rate."""
        from .data.corpus import CorpusError, load_audio
        if isinstance(x, (str, Path)):
            if sample_rate is not None:
                raise ValueError(f"sample_rate={sample_rate} is for arrays; the rate of {x} is read from the file")
            if not Path(x).is_file():
                raise FileNotFoundError(f"input file {x} does not exist")
            try:
                return load_audio(str(x), self.sample_rate)
            except CorpusError as e:
                raise ValueError(f"cannot read input: {e}") from None
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"expected a path, a numpy array or a tensor, got {type(x).__name__}")
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D (mono) signal, got shape {x.shape}")
        if x.size == 0:
            raise ValueError("empty signal")
        wav = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(wav).all():
            raise ValueError("signal has NaN/inf samples")
        if sample_rate is not None and sample_rate != self.sample_rate:
            import librosa      # as data.corpus.load_audio resamples files
            wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=self.sample_rate).astype(np.float32)
        return wav

    def speaker_id(self, speaker: str | int) -> int:
        """A speaker name or id -> id; unknown: KeyError (a name) or ValueError (an id) listing the known ones."""
        if isinstance(speaker, (int, np.integer)) and not isinstance(speaker, bool):
            if not 0 <= speaker < len(self.run.speakers):
                raise ValueError(f"speaker id {speaker} out of range 0..{len(self.run.speakers) - 1}; known "
                                 f"speakers: {', '.join(self.run.speakers)}")
            return int(speaker)
        return self.run.speaker_id(speaker)

    # --- encoding -----------------------------------------------------------------------------------
    def encode(self, x: Audio | Sequence[Audio], sample_rate: int | None = None,
               batch_size: int = 16) -> Encoding | list[Encoding]:
        """Latents (and VQ codes) of a signal, as `wavenet-ae encode` writes them; a list -> a list,
        encoded `batch_size` signals a forward (`encode.encode_signals`: as each alone, up to float
        rounding of the batched convolutions)."""
        if isinstance(x, (list, tuple)):
            wavs = [self.audio(one, sample_rate) for one in x]
            return [Encoding(*r) for r in _encode.encode_signals(self.model, wavs, batch_size)]
        return Encoding(*_encode.encode_signal(self.model, self.audio(x, sample_rate)))

    # --- generation ---------------------------------------------------------------------------------
    def generator(self, engine: str | None = None, weights: str | torch.dtype | None = None) -> _generate.Generator:
        """The generation engine with its packed weights, built once per (engine, weight dtype)."""
        eng = _generate.resolve_engine(engine or self.engine)
        dtype = _generate.resolve_weight_dtype(weights or self.weights, eng)
        key = (eng, dtype)
        if key not in self._generators:
            self._generators[key] = _generate.Generator(self.model.decoder, eng, weight_dtype=dtype)
        return self._generators[key]

    def resynthesize(self, x: Audio | Sequence[Audio], speaker: str | int | None = None, seed: int = 0,
                     sample_rate: int | None = None, engine: str | None = None,
                     weights: str | torch.dtype | None = None, progress: bool = False) -> np.ndarray | list:
        """Resynthesised (T,) float32 at `sample_rate` of the model, in `speaker`'s voice.

        speaker None: a path's parent folder when it names a known speaker (as the generate CLI does),
        else the first speaker (with a warning). seed: of the sampling uniforms. engine / weights:
        override the ones given to `load` ('auto' | python | cpp | cuda; 'auto' | fp32 | fp16 | bf16)."""
        if isinstance(x, (list, tuple)):
            return [self.resynthesize(one, speaker, seed, sample_rate, engine, weights, progress) for one in x]
        if speaker is None:
            parent = Path(x).parent.name if isinstance(x, (str, Path)) else None
            if parent in self.run.speakers:
                speaker = parent
            else:
                warnings.warn(f"no speaker given{'' if parent is None else f' and the folder {parent!r} is not a known speaker'}; "
                              f"using {self.run.speakers[0]!r}", UserWarning, stacklevel=2)
                speaker = 0
        spk = self.speaker_id(speaker)
        gen = self.generator(engine, weights)
        return _generate.resynthesize(self.model, self.audio(x, sample_rate), spk, seed=seed,
                                      progress=progress, generator=gen)

    def convert(self, x: Audio | Sequence[Audio], speaker: str | int, seed: int = 0, **kw) -> np.ndarray | list:
        """Voice conversion: the input's latents with `speaker`'s embedding (= resynthesize with a speaker)."""
        return self.resynthesize(x, speaker=speaker, seed=seed, **kw)


def load(path: str | Path, device: str | torch.device | None = None, engine: str = "auto",
         weights: str = "auto") -> Model:
    """A run directory (its latest checkpoint) or a model file (`wavenet-ae export`) -> `Model`.

    device: where the model computes (default: cuda when available, else cpu). engine, weights: the
    generation engine and its weight precision, as `wavenet-ae generate --engine/--weights`."""
    from . import cli
    for name, value, choices in (("engine", engine, _generate.ENGINES), ("weights", weights, _generate.WEIGHT_DTYPES)):
        if value != "auto" and value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of auto, {', '.join(choices)}")
    device = torch.device(device or cli.default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda but no CUDA device is available")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is neither a run directory nor a model file: it does not exist")
    return Model(load_run(path, device), device, engine, weights)
