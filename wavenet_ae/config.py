"""Hyper-parameters as dataclasses, with JSON round-trip and named presets.

Names follow the original author's notes (n_res, n_dil, n_skp, ...). A run stores its
`Config` as `config.json`; `Config.from_json(Config.to_json())` is the identity.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

BOTTLENECKS = ("ae", "vae", "vqvae")


@dataclass
class ModelConfig:
    # audio / features
    sample_rate: int = 16000
    n_mfcc: int = 13            # static MFCCs; with deltas and delta-deltas n_in = 3 * n_mfcc
    n_mels: int = 40
    mfcc_win: int = 400         # 25 ms analysis window (samples)
    mfcc_hop: int = 160         # 10 ms hop -> 100 Hz frames
    delta_width: int = 9        # librosa.feature.delta width (odd)
    # Floor of the log-mel power in dB (re 1.0): an absolute floor keeps every feature frame a function
    # of its own samples. None = librosa's default, a floor at 80 dB below the max of the *whole array*
    # the features are computed on, which makes a window's features depend on its batch-mates; only
    # runs made before this key existed use it (`Config.from_dict` fills None in for them).
    mfcc_floor_db: float | None = -100.0
    # Sliding-window CMVN of the encoder input (0 = off): each feature frame, after the corpus-wide
    # standardisation, has the mean subtracted and is divided by the standard deviation of the
    # `cmvn_frames` frames centred on it (odd). Per-utterance statistics would break the invariant that
    # a training window's features equal the whole file's cut to the window; a fixed-length window is
    # a valid (unpadded) layer like any other, so the receptive-field algebra (rfield.encoder_layers)
    # widens every encoder window by cmvn_frames - 1 frames and training, encode and generate agree.
    # Trade-off: the statistics span cmvn_frames * 10 ms, not the utterance: a short window also
    # removes part of the phonetic contrast, a long one widens the encoder window (training cost).
    cmvn_frames: int = 0
    # encoder (paper Figure 1): conv3, conv3 (residual), strided conv, conv3, conv3 (residual), FC stack
    n_enc: int = 768
    enc_kern: int = 3
    enc_stride_kern: int = 4
    enc_stride: int = 2         # 100 Hz -> 50 Hz
    n_enc_fc: int = 4
    # bottleneck
    bottleneck: str = "vqvae"
    n_latent: int = 64          # latent dims (n_lc_in of the decoder)
    n_codes: int = 512          # vqvae codebook size
    vq_commitment: float = 0.25
    vq_ema_decay: float = 0.99  # EMA codebook updates (0 = learn codebook by gradient)
    vq_dead_restart: bool = True
    # Steps the vqvae trains as a plain autoencoder (latents unquantised, in training and evaluation)
    # before the codebook is initialised from encoder outputs and quantisation starts; see `tiny`.
    vq_warmup_steps: int = 0
    vae_kl_weight: float = 1.0
    # free bits: each latent dimension's KL (nats per frame, batch mean) below this is not penalised,
    # so the prior cannot switch dimensions off (0 = the plain KL term)
    vae_free_bits: float = 0.0
    # decoder conditioning
    jitter_prob: float = 0.12
    n_lc_kern: int = 3          # Conv3 at 50 Hz before upsampling
    n_lc_out: int = 128
    lc_upsample_strides: list[int] = field(default_factory=lambda: [5, 4, 4, 4])
    lc_upsample_kern_sizes: list[int] = field(default_factory=lambda: [10, 8, 8, 8])
    n_speakers: int = 16
    n_global_embed: int = 32
    # Also feed the speaker embedding into the local-conditioning stack (concatenated to every latent
    # frame before the conv at 50 Hz), besides the per-layer global conditioning: a second, non-linear
    # path for the speaker that generation gets for free (the conditioning is computed up front).
    speaker_in_lc: bool = False
    # Remedies against a decoder that predicts from its own past (issue #20), training only:
    # with this probability each autoregressive input sample's class is replaced by a uniformly random
    # class (the targets stay clean), so that the decoder must lean on the conditioning.
    dec_input_noise: float = 0.0
    # Speaker-adversarial loss on the latents (0 = off): a small classifier (one hidden layer of
    # adv_hidden units, per latent frame) learns to name the speaker, and its gradient reaches the
    # encoder reversed and scaled by adv_weight (gradient reversal, Ganin & Lempitsky 2015).
    adv_weight: float = 0.0
    adv_hidden: int = 64
    # WaveNet decoder
    n_kern: int = 2             # taps of each dilated causal conv
    n_blocks: int = 2
    n_block_layers: int = 10    # dilations 1, 2, ..., 2**(n_block_layers-1) per block
    n_res: int = 64
    n_dil: int = 64             # gated channels (the dilated conv outputs 2 * n_dil)
    n_skp: int = 256
    n_post: int = 256
    n_quant: int = 256
    bias: bool = True

    @property
    def n_in(self) -> int:
        return 3 * self.n_mfcc

    @property
    def n_lc_in(self) -> int:
        return self.n_latent

    @property
    def hop(self) -> int:
        """wav samples per latent vector (320 at 16 kHz)."""
        return self.mfcc_hop * self.enc_stride

    @property
    def dilations(self) -> list[int]:
        return [2 ** i for _ in range(self.n_blocks) for i in range(self.n_block_layers)]

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

        need(self.bottleneck in BOTTLENECKS, f"bottleneck={self.bottleneck!r} not in {BOTTLENECKS}")
        need(self.mfcc_floor_db is None or (math.isfinite(self.mfcc_floor_db) and self.mfcc_floor_db < 0),
             f"mfcc_floor_db={self.mfcc_floor_db} must be a finite negative dB value (or null)")
        need(self.delta_width % 2 == 1 and self.delta_width >= 3, "delta_width must be odd and >= 3")
        need(self.mfcc_win >= self.mfcc_hop, "mfcc_win must be >= mfcc_hop")
        need(len(self.lc_upsample_strides) == len(self.lc_upsample_kern_sizes),
             "lc_upsample_strides and lc_upsample_kern_sizes differ in length")
        need(math.prod(self.lc_upsample_strides) == self.hop,
             f"prod(lc_upsample_strides)={math.prod(self.lc_upsample_strides)} must equal "
             f"the encoder hop mfcc_hop*enc_stride={self.hop}")
        for s, k in zip(self.lc_upsample_strides, self.lc_upsample_kern_sizes):
            need(k >= s, f"upsampling kernel {k} < stride {s} would leave gaps")
        need(self.n_kern >= 2, "n_kern must be >= 2")
        need(0.0 <= self.jitter_prob <= 1.0, "jitter_prob must lie in [0, 1]")
        need(self.vq_warmup_steps >= 0, "vq_warmup_steps must be >= 0")
        need(not (self.bottleneck == "vqvae" and self.vq_ema_decay == 0 and self.vq_dead_restart),
             "vq_dead_restart=true needs the EMA codebook (vq_ema_decay > 0): with vq_ema_decay=0 the "
             "codebook is learnt by gradient and has no usage counts to restart dead codes from; set "
             "vq_dead_restart=false for a gradient-learned codebook")
        need(self.vae_free_bits >= 0, "vae_free_bits must be >= 0")
        need(self.n_quant >= 2, "n_quant must be >= 2")
        need(self.cmvn_frames == 0 or (self.cmvn_frames >= 3 and self.cmvn_frames % 2 == 1),
             f"cmvn_frames={self.cmvn_frames} must be 0 (off) or odd and >= 3")
        need(0.0 <= self.dec_input_noise < 1.0, "dec_input_noise must lie in [0, 1)")
        need(self.adv_weight >= 0, "adv_weight must be >= 0")
        need(self.adv_hidden >= 1, "adv_hidden must be >= 1")


@dataclass
class DataConfig:
    n_batch: int = 8            # B: windows per batch
    n_win: int = 3200           # N: predicted samples per window (multiple of the hop)
    buffer_seconds: float = 120.0
    # share of a buffer's window starts drawn before refilling. Windows start at every sample, so
    # each sample is a target of N windows: drawing a fraction f covers it f * N times on average
    # (paper: 0.001 * 3200 = 3.2 times) before the next chunk of audio is loaded.
    fraction: float = 0.001
    valid_fraction: float = 0.1
    # where batches are cut: a prefetch "thread" of the training process, or a loader "process"
    # (spawned; batches reach the training process pickled). The same batches either way; the loader
    # ships raw windows and its work is mostly decoding, outside the GIL: benchmarks/data_speed.py
    # measured the thread's hand-over at ~0.01 ms a batch and the process's at ~0.45 ms.
    loader: str = "thread"


@dataclass
class TrainConfig:
    lr: float = 4e-4
    lr_warmup_steps: int = 500
    lr_decay_steps: int = 200_000
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    max_steps: int = 200_000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    validate_every: int = 1000
    log_every: int = 10
    seed: int = 1234
    # Linear phone and speaker probes on held-out latents at each validation (0 = off): fitted on this
    # many training files, scored on the validation files (diagnostics.ProbeTracker).
    probe_files: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "paper"

    def validate(self) -> None:
        self.model.validate()
        if self.data.n_win % self.model.hop:
            raise ValueError(f"invalid data config: n_win={self.data.n_win} must be a multiple of "
                             f"the encoder hop {self.model.hop}")
        if self.data.loader not in ("thread", "process"):
            raise ValueError(f"invalid data config: loader={self.data.loader!r}, expected thread or process")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub_cls = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}.get(f.name)
            sub = d[f.name]
            if f.name == "model" and "mfcc_floor_db" not in sub:
                sub = {**sub, "mfcc_floor_db": None}    # stored before local features: keep its definition
            kw[f.name] = _build(sub_cls, sub, f.name) if sub_cls else sub
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    def with_overrides(self, overrides: list[str]) -> "Config":
        """Apply `section.key=value` (or unambiguous `key=value`) strings; values parse as JSON."""
        d = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects key=value, got {item!r}")
            section, name = _locate(d, key.strip())
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            old = d[section][name]
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(old) is not type(value):
                raise ValueError(f"--set {key}: expected {type(old).__name__}, got {raw!r}")
            d[section][name] = value
        cfg = Config.from_dict(d)
        cfg.validate()
        return cfg


def _build(cls, d: dict[str, Any], section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys in config section {section!r}: {sorted(unknown)}")
    return cls(**d)


def _locate(d: dict[str, Any], key: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section in d and isinstance(d[section], dict) and name in d[section]:
            return section, name
        raise ValueError(f"unknown config key {key!r}")
    hits = [s for s, v in d.items() if isinstance(v, dict) and key in v]
    if len(hits) != 1:
        raise ValueError(f"config key {key!r} is {'ambiguous' if hits else 'unknown'}"
                         + (f" (in {hits})" if hits else ""))
    return hits[0], key


def paper() -> Config:
    """Chorowski et al. 2019, Figure 1. Choices the paper leaves open are documented inline:
    codebook 512 (their VQ experiments range 32..512 codes per 50 Hz frame), commitment 0.25
    (VQ-VAE paper), EMA codebook updates (more stable than the codebook loss, fewer dead codes),
    windows of 0.2 s predicted samples (decoder field is 2047 samples, ~0.13 s), Adam 4e-4."""
    cfg = Config(preset="paper")
    cfg.validate()
    return cfg


def tiny() -> Config:
    """Trains visibly in minutes on 2 CPU cores: narrow encoder, 1 x 8 layer decoder."""
    m = ModelConfig(
        n_enc=64, n_enc_fc=2, n_latent=16, n_codes=64, n_lc_out=32,
        lc_upsample_strides=[5, 4, 4, 4], lc_upsample_kern_sizes=[10, 8, 8, 8],
        n_global_embed=16, n_blocks=1, n_block_layers=8,
        n_res=32, n_dil=32, n_skp=64, n_post=64,
        # Without a warm-up the decoder ignored the latents for ~1000 steps on the demo corpus while the
        # encoder collapsed onto 1-5 codes (conditioning gain 0, perplexity <= 3.4 at step 1000);
        # benchmarks/representation.py compares.
        vq_warmup_steps=500,
        # Without free bits the VAE's prior switched latent dimensions off (2 of 16 active at step 3000)
        # and the conditioning gain stayed at 0.04-0.13 nats/sample; with 0.25 nats per dimension and
        # frame (~ the VQ-VAE's 5.6 bits per frame in all) all 16 stayed active and the gain reached 0.35
        # by step 1000 (benchmarks/representation.py).
        vae_free_bits=0.25,
    )
    cfg = Config(model=m, data=DataConfig(n_batch=8, n_win=1280, buffer_seconds=60.0, fraction=0.002),
                 train=TrainConfig(lr=1e-3, lr_warmup_steps=50, lr_decay_steps=5000, max_steps=2000,
                                   checkpoint_every=200, validate_every=200),
                 preset="tiny")
    cfg.validate()
    return cfg


def small() -> Config:
    """The paper's structure within ~30 minutes of training on one CPU core (two runs side by side fill
    a 2-core machine): its encoder shape (conv3, conv3 residual, strided conv4, 2 x conv3 residual,
    4 residual FC layers) at 512 channels instead of 768, 64-dim latents, and its 2 x 10 layer decoder
    (dilations 1..512, receptive field 2047 samples) at 32 residual / 128 skip channels instead of
    64 / 256. Codebook 256 (the paper's range is 32..512); the VQ warm-up, free bits and learning rate
    are the `tiny` preset's (measured there, see benchmarks/results/representation-tiny.md).
    Calibration: 0.64 s of CPU (process) time per training step with OMP_NUM_THREADS=1 on the 2-core
    AMD EPYC the benchmarks ran on (shared with other jobs, hence process rather than wall time;
    batch 8 x 1280 samples, loader thread included), so 2500 steps ~ 27 minutes, plus ~1 s per
    validation (every 250 steps, with the probes of `train.probe_files`)."""
    m = ModelConfig(
        n_enc=512, n_enc_fc=4, n_latent=64, n_codes=256, n_lc_out=64, n_global_embed=32,
        n_blocks=2, n_block_layers=10, n_res=32, n_dil=32, n_skp=128, n_post=128,
        vq_warmup_steps=500, vae_free_bits=0.25,
    )
    cfg = Config(model=m, data=DataConfig(n_batch=8, n_win=1280, buffer_seconds=60.0, fraction=0.002),
                 train=TrainConfig(lr=1e-3, lr_warmup_steps=100, lr_decay_steps=2500, max_steps=2500,
                                   checkpoint_every=250, validate_every=250, probe_files=24),
                 preset="small")
    cfg.validate()
    return cfg


PRESETS = {"paper": paper, "small": small, "tiny": tiny}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
