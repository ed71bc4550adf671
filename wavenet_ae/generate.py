"""Autoregressive generation with fast-wavenet caching, and the resynthesis CLI.

    python -m wavenet_ae.generate --run-dir DIR --input in.wav --out out.wav [--speaker NAME]
        [--engine auto|python|cpp|cuda] [--weights auto|fp32|fp16|bf16]

Another speaker than the input's gives voice conversion: the latents come from the input, the speaker
embedding from `--speaker`.

Timing (as in training windows, `tests/test_model.py`): the conditioning `lc` covers wav times
[-R, T) (`WaveNetAE.signal_conditioning`); the R samples at times -R..-1 are a teacher-forced history
(mu-law silence by default), then T samples are drawn. Step i of the engines consumes the class
emitted at step i - 1 (step 0 consumes `x0`) and predicts the class at time i - R + 1, conditioned on
lc index i + 1. The per-layer conditioning cond_l = lc_proj_l(lc) + gc_proj_l(g) + bias_l of each
step is computed up front, chunk by chunk (one batched matmul per chunk), then the engine runs the
chunk's steps in one call:

* ``python``: `ops.wavenet_generate_ref`, a plain PyTorch loop over steps (the reference);
* ``cpp``: `torch.ops.wavenet_ae.wavenet_generate` on CPU, the whole chunk in C++ (AVX2 or generic),
  weight matrices in float32, float16 or bfloat16 (`--weights`, float32 arithmetic);
* ``cuda``: the same op on GPU, one persistent kernel launch per chunk.

All engines draw class k of softmax(logits) by inverse CDF at caller-supplied uniforms u, so given
the same u they emit the same samples up to float rounding near CDF boundaries (tests/test_generate.py).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import ops
from .model.decoder import WaveNet
from .ops import GenWeights

ENGINES = ("python", "cpp", "cuda")
# Weight precisions of the engine matrices (`--weights`); 'auto' resolves by resolve_weight_dtype.
WEIGHT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CHUNK = 4000              # steps per engine call
COND_BUDGET_BYTES = 256 << 20     # bound on one chunk's precomputed conditioning


class EngineUnavailable(RuntimeError):
    pass


def available_engines() -> list[str]:
    out = ["python"]
    if ops.has_kernel("wavenet_generate", "cpu"):
        out.append("cpp")
    if ops.has_kernel("wavenet_generate", "cuda") and torch.cuda.is_available():
        out.append("cuda")
    return out


def resolve_engine(name: str) -> str:
    """'auto' -> cuda > cpp > python (what is available); an explicit engine is checked."""
    if name == "auto":
        avail = available_engines()
        best = "cuda" if "cuda" in avail else "cpp" if "cpp" in avail else "python"
        if best == "python":
            warnings.warn("wavenet_ae._C has no generation kernels; using the slow python engine. "
                          f"Rebuild with: {ops.REBUILD_CMD}", RuntimeWarning, stacklevel=2)
        return best
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of auto, {', '.join(ENGINES)}")
    if name == "cpp" and not ops.has_kernel("wavenet_generate", "cpu"):
        raise EngineUnavailable(f"engine 'cpp' needs the compiled extension wavenet_ae._C "
                                f"({ops.EXT_IMPORT_ERROR}); rebuild with: {ops.REBUILD_CMD}")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EngineUnavailable("engine 'cuda' needs a CUDA GPU; none is visible")
        if not ops.has_kernel("wavenet_generate", "cuda"):
            raise EngineUnavailable("engine 'cuda': wavenet_ae._C was built without CUDA kernels; rebuild with "
                                    f"WAVENET_AE_FORCE_CUDA=1 {ops.REBUILD_CMD}")
    return name


def resolve_weight_dtype(weights: str | torch.dtype, engine: str) -> torch.dtype:
    """'auto' | 'fp32' | 'fp16' | 'bf16' (or a torch dtype) -> the dtype of the engine's weight matrices.

    'auto' is a fixed rule of the engine and the CPU, never a timing: fp16 for the cpp engine where its
    avx2 path runs (F16C widening; fp16 is the more accurate of the two 16-bit formats, within the bound
    tests/test_generate_precision.py checks, and halves the bytes each step streams: ~1.3x faster at
    batch 1 here); float32 on the generic path (its portable conversions cost more than the bytes they
    save), for the python engine (the reference) and for cuda (its default so far)."""
    if isinstance(weights, torch.dtype):
        if weights not in WEIGHT_DTYPES.values():
            raise ValueError(f"unknown weight dtype {weights}; choose one of auto, {', '.join(WEIGHT_DTYPES)}")
        return weights
    if weights == "auto":
        if engine == "cpp" and ops.wavenet_generate_cpu_path("auto") == "avx2":
            return torch.float16
        return torch.float32
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {weights!r}; choose one of auto, {', '.join(WEIGHT_DTYPES)}")
    return WEIGHT_DTYPES[weights]


# ---------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------

@dataclass
class PackedDecoder:
    """A WaveNet decoder prepared once for generation: the engine's weights plus the stacked
    per-layer conditioning projections (used chunk by chunk to build `cond`)."""
    weights: GenWeights
    lc_proj: torch.Tensor     # (n_lc_out, L * 2 n_dil): cond = lc^T @ lc_proj + g @ gc_proj + cond_bias
    gc_proj: torch.Tensor     # (n_global_embed, L * 2 n_dil)
    cond_bias: torch.Tensor   # (L * 2 n_dil,)  the dilated convs' biases
    receptive_field: int

    @property
    def cond_width(self) -> int:
        return self.cond_bias.shape[0]


def _bias(conv: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor:
    return conv.bias.detach() if conv.bias is not None else like.new_zeros(n)


@torch.no_grad()
def pack_decoder(decoder: WaveNet, device=None, weight_dtype: torch.dtype = torch.float32) -> PackedDecoder:
    """Transpose every matrix to input-major contiguous form (``y = x @ W``), stack the per-layer
    projections; see `ops.GenWeights`. `weight_dtype` applies to the four engine matrices only
    (float16/bfloat16 for the cpp and cuda engines; conditioning, embedding and biases stay float32)."""
    device = torch.device(device) if device is not None else next(decoder.parameters()).device
    f32 = dict(device=device, dtype=torch.float32)
    layers = list(decoder.layers)
    l0 = layers[0]
    n_res, n_dil = l0.dil_conv.in_channels, l0.n_dil
    n_skp = l0.skip.out_channels
    w_dil, w_out, b_out, lcp, gcp, bdil = [], [], [], [], [], []
    for layer in layers:
        W = layer.dil_conv.weight.detach()                              # (2 n_dil, n_res, K)
        w_dil.append(W.permute(2, 1, 0))                                # (K, n_res, 2 n_dil)
        skip_w = layer.skip.weight.detach()[:, :, 0].t()                # (n_dil, n_skp)
        skip_b = _bias(layer.skip, n_skp, skip_w)
        if layer.res is None:
            res_w, res_b = skip_w.new_zeros(n_dil, n_res), skip_w.new_zeros(n_res)
        else:
            res_w, res_b = layer.res.weight.detach()[:, :, 0].t(), _bias(layer.res, n_res, skip_w)
        w_out.append(torch.cat([res_w, skip_w], 1))
        b_out.append(torch.cat([res_b, skip_b]))
        lcp.append(layer.lc_proj.weight.detach()[:, :, 0])             # (2 n_dil, n_lc_out)
        gcp.append(layer.gc_proj.weight.detach())                       # (2 n_dil, n_global)
        bdil.append(_bias(layer.dil_conv, 2 * n_dil, W))
    wd = dict(device=device, dtype=weight_dtype)
    weights = GenWeights(
        embed=decoder.embed.weight.detach().to(**f32).contiguous(),
        w_dil=torch.stack(w_dil).to(**wd).contiguous(),
        w_out=torch.stack(w_out).to(**wd).contiguous(),
        b_out=torch.stack(b_out).to(**f32).contiguous(),
        w_post1=decoder.post1.weight.detach()[:, :, 0].t().to(**wd).contiguous(),
        b_post1=_bias(decoder.post1, decoder.post1.out_channels, W).to(**f32).contiguous(),
        w_post2=decoder.post2.weight.detach()[:, :, 0].t().to(**wd).contiguous(),
        b_post2=_bias(decoder.post2, decoder.post2.out_channels, W).to(**f32).contiguous(),
        dilations=tuple(int(layer.dilation) for layer in layers),
    )
    return PackedDecoder(weights=weights,
                         lc_proj=torch.cat(lcp).t().to(**f32).contiguous(),
                         gc_proj=torch.cat(gcp).t().to(**f32).contiguous(),
                         cond_bias=torch.cat(bdil).to(**f32).contiguous(),
                         receptive_field=decoder.receptive_field)


# ---------------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------------

class Generator:
    """Incremental generation from a WaveNet decoder with one engine.

    engine: 'auto' | 'python' | 'cpp' | 'cuda'. The python engine runs on `device` (default: the
    decoder's); cpp on the CPU; cuda on the current GPU. weight_dtype: the engine matrices' precision,
    a torch dtype or 'auto' | 'fp32' | 'fp16' | 'bf16' (`resolve_weight_dtype`); float16/bfloat16 are
    for the cpp and cuda engines (float32 accumulation). cpu_path: the cpp engine's code path ('auto' |
    'generic' | 'avx2'). The cpp engine uses torch's intra-op threads (torch.set_num_threads) across the
    batch.
    """

    def __init__(self, decoder: WaveNet, engine: str = "auto", device=None,
                 weight_dtype: str | torch.dtype = torch.float32, cpu_path: str = "auto"):
        self.engine = resolve_engine(engine)
        weight_dtype = resolve_weight_dtype(weight_dtype, self.engine)
        if self.engine == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        elif self.engine == "cpp":
            device = torch.device("cpu")
        if weight_dtype != torch.float32 and self.engine == "python":
            raise ValueError(f"weight dtype {weight_dtype}: the python engine (the reference) runs float32; "
                             "reduced-precision weights are for the cpp and cuda engines")
        self.packed = pack_decoder(decoder, device, weight_dtype)
        self.device = self.packed.weights.embed.device
        self.cpu_path = ops.wavenet_generate_cpu_path(cpu_path) if self.engine == "cpp" else None
        self.n_quant = self.packed.weights.n_quant

    @property
    def receptive_field(self) -> int:
        return self.packed.receptive_field

    def describe(self) -> str:
        """e.g. 'cpp (avx2, float16 weights, 2 threads)' or 'cuda (NVIDIA H100, float16 weights)'."""
        dt = str(self.packed.weights.w_dil.dtype).replace("torch.", "")
        if self.engine == "cpp":
            return f"cpp ({self.cpu_path}, {dt} weights, {torch.get_num_threads()} threads)"
        if self.engine == "cuda":
            return f"cuda ({torch.cuda.get_device_name(self.device)}, {dt} weights)"
        return f"python ({self.device}, {torch.get_num_threads()} threads)"

    def default_chunk(self, batch: int) -> int:
        per_step = max(1, batch) * self.packed.cond_width * 4
        return int(max(64, min(DEFAULT_CHUNK, COND_BUDGET_BYTES // per_step)))

    def new_queues(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, sum(self.packed.weights.queue_rows), self.packed.weights.n_res,
                           device=self.device)

    def conditioning(self, lc: torch.Tensor, gcb: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """lc (B, n_lc_out, S) for S steps, gcb (B, L * 2 n_dil) -> cond (B, S, L * 2 n_dil), one batched
        matmul (written into `out` if given)."""
        lc_t = lc.transpose(1, 2).contiguous()         # (B, S, n_lc_out): GEMM-friendly, 2-3x faster
        return torch.baddbmm(gcb[:, None, :], lc_t, self.packed.lc_proj.expand(lc.shape[0], -1, -1), out=out)

    def _engine_call(self, cond, u, forced, queues, x_prev, t0, want_logits):
        w = self.packed.weights
        if self.engine == "python":
            return ops.wavenet_generate_ref(w, cond, u, forced, queues, x_prev, t0, want_logits)
        return ops.wavenet_generate(w, cond, u, forced, queues, x_prev, t0, want_logits, self.cpu_path or "auto")

    @torch.no_grad()
    def run(self, lc: torch.Tensor, g: torch.Tensor, x0: torch.Tensor, forced: torch.Tensor | None = None,
            u: torch.Tensor | None = None, want_logits: bool = False, chunk: int | None = None,
            progress: bool | None = False):
        """Run S steps from fresh (zero) queues.

        lc: (B, n_lc_out, S) conditioning of each step; g: (B, n_global_embed) speaker embeddings;
        x0: (B,) int64 class consumed by step 0; forced: (B, S) int64, >= 0 to emit that class
        (teacher forcing), < 0 to sample; u: (B, S) uniforms (default 0; only read where sampling).
        Returns samples (B, S) int64 and, if want_logits, logits (B, S, n_quant) (else None), on the
        engine's device. Outputs of the first R - 1 steps depend on the zero initial queues.
        """
        dev = self.device
        B, _, S = lc.shape
        lc = lc.to(dev, torch.float32)
        x_prev = x0.to(dev, torch.int64).reshape(B).clone()
        u = torch.zeros(B, S, device=dev) if u is None else u.to(dev, torch.float32)
        forced = None if forced is None else forced.to(dev, torch.int64)
        if not (u.shape == (B, S) and (forced is None or forced.shape == (B, S))):
            raise ValueError(f"u {tuple(u.shape)} and forced {None if forced is None else tuple(forced.shape)} "
                             f"must be (B, S) = {(B, S)}")
        gcb = g.to(dev, torch.float32) @ self.packed.gc_proj + self.packed.cond_bias        # (B, L*2nd)
        queues = self.new_queues(B)
        chunk = chunk or self.default_chunk(B)
        samples, logits = [], []
        # one conditioning buffer for every chunk; the last, shorter chunk takes its head instead of a
        # second B x chunk x L*2n_dil float32 block (up to COND_BUDGET_BYTES, faulted in page by page)
        buf = torch.empty(B * min(chunk, S) * self.packed.cond_width, device=dev)
        from tqdm.auto import tqdm
        with tqdm(total=S, disable=not progress if progress is not None else None, unit="sample",
                  unit_scale=True, desc=f"generate [{self.engine}]", leave=False, file=sys.stderr) as bar:
            for s0 in range(0, S, chunk):
                s1 = min(S, s0 + chunk)
                out = buf[:B * (s1 - s0) * self.packed.cond_width].view(B, s1 - s0, self.packed.cond_width)
                cond = self.conditioning(lc[:, :, s0:s1], gcb, out)
                f = None if forced is None else forced[:, s0:s1].contiguous()
                smp, lg = self._engine_call(cond, u[:, s0:s1].contiguous(), f, queues, x_prev, s0, want_logits)
                samples.append(smp)
                if want_logits:
                    logits.append(lg)
                bar.update(s1 - s0)
        return torch.cat(samples, 1), (torch.cat(logits, 1) if want_logits else None)

    def silence_class(self) -> int:
        return int(ops.mu_law_encode(torch.zeros(1), self.n_quant)[0])

    @torch.no_grad()
    def generate(self, lc: torch.Tensor, g: torch.Tensor, u: torch.Tensor | None = None,
                 history: torch.Tensor | None = None, seed: int = 0, chunk: int | None = None,
                 progress: bool | None = False, want_logits: bool = False):
        """Draw T samples.

        lc: (B, n_lc_out, R + T) conditioning for wav times [-R, T); g: (B, n_global_embed);
        u: (B, T) uniforms (default: torch.rand seeded with `seed`); history: (B, R) classes at times
        -R..-1 (default: mu-law silence). Returns classes (B, T) int64 on the CPU (and logits
        (B, T, n_quant) if want_logits).
        """
        R = self.receptive_field
        B, _, n = lc.shape
        T = n - R
        if T <= 0:
            raise ValueError(f"lc covers {n} steps; it must cover the receptive field R={R} plus the samples")
        if history is None:
            history = torch.full((B, R), self.silence_class(), dtype=torch.int64)
        history = history.to(torch.int64).cpu()
        if history.shape != (B, R):
            raise ValueError(f"history must be (B, R) = {(B, R)}, got {tuple(history.shape)}")
        if u is None:
            u = torch.rand(B, T, generator=torch.Generator().manual_seed(seed))
        forced = torch.cat([history[:, 1:], torch.full((B, T), -1, dtype=torch.int64)], 1)
        u_all = torch.cat([torch.zeros(B, R - 1), u.cpu().float()], 1)
        smp, lg = self.run(lc[:, :, 1:], g, history[:, 0], forced, u_all, want_logits, chunk, progress)
        out = smp[:, R - 1:].cpu()
        return (out, lg[:, R - 1:].cpu()) if want_logits else out


# ---------------------------------------------------------------------------------------------------
# resynthesis and the CLI
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def resynthesize(model, wav: np.ndarray, speaker_id: int, engine: str = "auto", seed: int = 0,
                 weight_dtype: str | torch.dtype = torch.float32, cpu_path: str = "auto", chunk: int | None = None,
                 progress: bool | None = False, generator: Generator | None = None) -> np.ndarray:
    """wav (T,) float32 at the model rate -> resynthesised (T,) float32 with speaker `speaker_id`
    (the input's speaker: reconstruction; another: voice conversion)."""
    model.eval()
    lc, _, g = model.signal_conditioning(wav, torch.tensor(int(speaker_id)))
    gen = generator or Generator(model.decoder, engine, weight_dtype=weight_dtype, cpu_path=cpu_path)
    q = gen.generate(lc, g, seed=seed, chunk=chunk, progress=progress)
    return ops.mu_law_decode(q[0], model.cfg.n_quant).numpy()


def main(argv: list[str] | None = None) -> int:
    from . import cli
    ap = cli.parser("generate", "Resynthesise (or voice-convert) a wav file with a trained run.")
    cli.add_run_dir(ap)
    ap.add_argument("--input", required=True, help="input audio file (wav/flac/ogg; resampled to the model rate)")
    ap.add_argument("--out", required=True, help="output wav file")
    ap.add_argument("--speaker", help="target speaker name (default: the input's parent folder if it names a "
                                      "known speaker, else the first speaker)")
    cli.add_generation(ap)
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampling uniforms")
    ap.add_argument("--cpu-path", default="auto", choices=("auto", "generic", "avx2"), help="cpp engine code path")
    ap.add_argument("--chunk", type=int, help="steps per engine call (default: up to 4000)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)

    from .data.corpus import CorpusError, load_audio
    from .run_dir import RunDirError, load_run

    cli.apply_threads(a.threads)
    try:
        engine = resolve_engine(a.engine)
    except (EngineUnavailable, ValueError) as e:
        cli.fail(ap, str(e))
    device = "cuda" if engine == "cuda" else "cpu"
    try:
        run = load_run(a.run_dir, device)
    except RunDirError as e:
        cli.fail(ap, str(e))
    m = run.config.model
    if a.speaker is not None:
        try:
            spk = run.speaker_id(a.speaker)
        except KeyError as e:
            cli.fail(ap, e.args[0])
    else:
        parent = Path(a.input).parent.name
        spk = run.speakers.index(parent) if parent in run.speakers else 0
        if parent not in run.speakers:
            print(f"no --speaker given and the input's folder {parent!r} is not a known speaker; "
                  f"using {run.speakers[0]!r}", file=sys.stderr)
    if not Path(a.input).is_file():
        cli.fail(ap, f"input file {a.input} does not exist")
    try:
        wav = load_audio(a.input, m.sample_rate)
    except CorpusError as e:
        cli.fail(ap, f"cannot read input: {e}")
    try:
        gen = Generator(run.model.decoder, engine, weight_dtype=a.weights, cpu_path=a.cpu_path)
    except (EngineUnavailable, ValueError, RuntimeError) as e:
        cli.fail(ap, str(e))

    print(f"run {run.dir} (step {run.step}), speaker {run.speakers[spk]!r}, engine {gen.describe()}, "
          f"{len(wav)} samples ({len(wav) / m.sample_rate:.2f} s)", file=sys.stderr)
    t = time.perf_counter()
    out = resynthesize(run.model, wav, spk, seed=a.seed, chunk=a.chunk,
                       progress=None if not a.no_progress else False, generator=gen)
    dt = time.perf_counter() - t
    import soundfile as sf
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(a.out, out, m.sample_rate)
    print(f"wrote {a.out}: {len(out)} samples in {dt:.1f} s ({len(out) / dt:.0f} samples/s, "
          f"{len(out) / m.sample_rate / dt:.2f}x real time)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
