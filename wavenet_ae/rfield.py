"""Exact receptive-field algebra of the WaveNet autoencoder.

Every layer that touches time is a `Layer` (kernel, stride, dilation, transposed). A layer maps an
inclusive range of output indices to the inclusive range of input indices it reads; chains compose.
`WindowPlan` turns this into training windows: for N predicted samples at wav times [t0, t0 + N)

    decoder window  wav[t0 - dec_context, t0 + N)                (inputs + targets)
    encoder window  wav[t0 - enc_offset, t0 - enc_offset + enc_len)

so that every predicted sample's receptive field lies inside the joint window (no masks needed).
The field is the training-time one: with jitter on, a latent may be replaced by a neighbour, so the
jitter layer counts as a kernel-3 layer (at evaluation the true dependency is a subset).

Run `python -m wavenet_ae.rfield [--preset P] [--config run/config.json] [--set k=v]` for the table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .config import Config, ModelConfig, preset


@dataclass(frozen=True)
class Layer:
    name: str
    kernel: int
    stride: int = 1
    dilation: int = 1
    transposed: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def input_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Inclusive input index range read by the inclusive output index range [lo, hi]."""
        if self.transposed:  # output o reads inputs i with 0 <= o - i*stride < span
            return -((self.span - 1 - lo) // self.stride), hi // self.stride
        return lo * self.stride, hi * self.stride + self.span - 1

    def out_len(self, n_in: int) -> int:
        if self.transposed:
            return (n_in - 1) * self.stride + self.span
        return max(0, (n_in - self.span) // self.stride + 1)


def chain_range(layers: Sequence[Layer], lo: int, hi: int) -> tuple[int, int]:
    """Input range of a chain (applied first to last) for the output range [lo, hi]."""
    for layer in reversed(layers):
        lo, hi = layer.input_range(lo, hi)
    return lo, hi


def chain_out_len(layers: Sequence[Layer], n_in: int) -> int:
    for layer in layers:
        n_in = layer.out_len(n_in)
    return n_in


def chain_field(layers: Sequence[Layer]) -> int:
    """Inputs read by one output of a chain of plain (non-transposed) layers."""
    lo, hi = chain_range(layers, 0, 0)
    return hi - lo + 1


# --- the model's layers, path by path ------------------------------------------------------------

def featurizer_layers(m: ModelConfig) -> list[Layer]:
    """wav samples -> MFCC+delta frames (librosa, center=False, delta edges trimmed)."""
    return [Layer("mfcc", m.mfcc_win, m.mfcc_hop), Layer("deltas", m.delta_width)]


def encoder_layers(m: ModelConfig) -> list[Layer]:
    """feature frames -> latent vectors (valid convolutions; residual branches are cropped)."""
    k = m.enc_kern
    layers = [Layer("cmvn", m.cmvn_frames)] if m.cmvn_frames else []     # sliding-window statistics
    layers += [Layer("conv_in", k), Layer("conv_res", k),
              Layer("conv_stride", m.enc_stride_kern, m.enc_stride),
              Layer("conv_mid", k), Layer("conv_res2", k)]
    layers += [Layer(f"fc{i}", 1) for i in range(m.n_enc_fc)]
    return layers + [Layer(f"bottleneck_{m.bottleneck}", 1)]


def conditioning_layers(m: ModelConfig) -> list[Layer]:
    """latent vectors -> local-conditioning samples (jitter, conv at 50 Hz, transposed convs)."""
    layers = [Layer("jitter", 3)] if m.jitter_prob > 0 else []
    layers.append(Layer("lc_conv", m.n_lc_kern))
    layers += [Layer(f"upsample{i}", k, s, transposed=True)
               for i, (s, k) in enumerate(zip(m.lc_upsample_strides, m.lc_upsample_kern_sizes))]
    return layers


def decoder_layers(m: ModelConfig) -> list[Layer]:
    """past wav samples -> logits; each dilated layer also reads the conditioning (see WindowPlan)."""
    layers = [Layer("embed", 1)]
    layers += [Layer(f"dilated{i}", m.n_kern, 1, d) for i, d in enumerate(m.dilations)]
    return layers + [Layer("post", 1)]


# --- windows -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowPlan:
    """Window geometry for N predicted samples. All lengths in wav samples unless named otherwise."""
    n_win: int            # N
    dec_context: int      # R: decoder receptive field (samples before the first target)
    enc_offset: int       # A: encoder window starts A samples before the first target
    enc_len: int          # encoder window length
    n_frames: int         # feature frames (MFCC + deltas) the encoder consumes
    n_latents: int        # latent vectors the encoder produces
    lc_crop: int          # first used index of the upsampled conditioning
    lc_len: int           # conditioning samples the decoder reads (N + (k-1)(sum d - d_1))
    lc_time_offset: int   # conditioning index o is at wav time e0 + o + lc_time_offset
    hop: int

    @property
    def dec_len(self) -> int:
        return self.n_win + self.dec_context

    @property
    def before(self) -> int:
        """Joint window: samples before the first target."""
        return max(self.dec_context, self.enc_offset)

    @property
    def after(self) -> int:
        """Joint window: samples from the first target to the end."""
        return max(self.n_win, self.enc_len - self.enc_offset)

    @property
    def total_len(self) -> int:
        return self.before + self.after

    @property
    def dec_start(self) -> int:
        """Start of the decoder window inside the joint window."""
        return self.before - self.dec_context

    @property
    def enc_start(self) -> int:
        return self.before - self.enc_offset


def plan(m: ModelConfig, n_win: int) -> WindowPlan:
    m.validate()
    if n_win <= 0 or n_win % m.hop:
        raise ValueError(f"n_win={n_win} must be a positive multiple of the hop {m.hop}")
    dil = m.dilations
    k = m.n_kern
    R = 1 + (k - 1) * sum(dil)
    lc_back = (k - 1) * (sum(dil) - dil[0])           # first layer reads conditioning this far back
    lc_len = n_win + lc_back
    cond = conditioning_layers(m)
    pre = [layer for layer in cond if not layer.transposed]
    up = [layer for layer in cond if layer.transposed]
    S = math.prod(layer.stride for layer in up)
    K = 1 + sum((layer.span - 1) * math.prod(u.stride for u in up[i + 1:]) for i, layer in enumerate(up))
    pre_ctx = sum(layer.span - 1 for layer in pre)
    f_enc = chain_field(featurizer_layers(m) + encoder_layers(m))
    # centre the conditioning: index o sits at the middle of its wav field
    lc_time_offset = round(S * pre_ctx / 2 + (f_enc - 1) / 2 - (K - 1) / 2)
    lc_crop = K - S                                     # smallest crop whose first latent is latent 0
    n_up_in = (lc_crop + lc_len - 1) // S + 1
    n_latents = n_up_in + pre_ctx
    enc_len = (n_latents - 1) * m.hop + f_enc
    n_frames = (n_latents - 1) * m.enc_stride + chain_field(encoder_layers(m))
    enc_offset = lc_crop + lc_time_offset + lc_back
    return WindowPlan(n_win=n_win, dec_context=R, enc_offset=enc_offset, enc_len=enc_len,
                      n_frames=n_frames, n_latents=n_latents, lc_crop=lc_crop, lc_len=lc_len,
                      lc_time_offset=lc_time_offset, hop=m.hop)


def output_field(m: ModelConfig, p: WindowPlan, j0: int, j1: int) -> dict[str, tuple[int, int]]:
    """Inputs that predicted samples j0..j1 (indices into the N targets) depend on.

    Keys: `dec_wav` (decoder window positions), `lc` (cropped conditioning indices), `latents`,
    `frames` (feature frames), `enc_wav` (encoder window positions); all inclusive ranges.
    """
    dil, k = m.dilations, m.n_kern
    lc_back = (k - 1) * (sum(dil) - dil[0])
    dec = (j0, j1 + p.dec_context - 1)                    # target j = window[j + R]; reads j..j+R-1
    lc = (j0, j1 + lc_back)                               # cropped conditioning index of time t0+j-lc_back
    up_lo, up_hi = lc[0] + p.lc_crop, lc[1] + p.lc_crop
    lat = chain_range(conditioning_layers(m), up_lo, up_hi)
    frames = chain_range(encoder_layers(m), *lat)
    wav = chain_range(featurizer_layers(m), *frames)
    return {"dec_wav": dec, "lc": lc, "latents": lat, "frames": frames, "enc_wav": wav}


# --- the table -----------------------------------------------------------------------------------

def table(cfg: Config) -> str:
    m = cfg.model
    rows = [("path", "layer", "kernel", "stride", "dilation", "field (path input)", "field (wav)")]

    def add(path: str, layers: list[Layer], to_wav: list[Layer]) -> None:
        for i, layer in enumerate(layers):
            lo, hi = chain_range(layers[: i + 1], 0, 0)
            wlo, whi = chain_range(to_wav + layers[: i + 1], 0, 0)
            stride = f"1/{layer.stride}" if layer.transposed else str(layer.stride)
            rows.append((path, layer.name, str(layer.kernel), stride, str(layer.dilation),
                         str(hi - lo + 1), str(whi - wlo + 1)))

    enc = featurizer_layers(m) + encoder_layers(m)
    add("encoder", enc, [])
    add("conditioning", conditioning_layers(m), enc)
    add("decoder", decoder_layers(m), [])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if j > 1 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    p = plan(m, cfg.data.n_win)
    f = output_field(m, p, 0, 0)
    lines += [
        "",
        f"N (n_win) = {p.n_win} predicted samples per window, hop = {p.hop}",
        f"decoder window  = N + {p.dec_context} (receptive field {p.dec_context} past samples)",
        f"encoder window  = N + {p.enc_len - p.n_win} ({p.n_frames} feature frames -> {p.n_latents} latents),"
        f" starts {p.enc_offset} samples before the first target",
        f"joint window    = N + {p.total_len - p.n_win} samples ({p.total_len / m.sample_rate:.3f} s)",
        f"one predicted sample reads wav [{f['enc_wav'][0] - p.enc_offset}, {f['enc_wav'][1] - p.enc_offset}]"
        f" (encoder) and [{-p.dec_context}, -1] (decoder) relative to itself",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from . import cli
    ap = cli.parser("rfield", __doc__.split("\n")[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--config", help="a run's config.json (overrides --preset)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    try:
        if a.config:
            with open(a.config) as fh:
                cfg = Config.from_json(fh.read())
        else:
            cfg = preset(a.preset)
        cfg = cfg.with_overrides(a.set)
    except (OSError, ValueError, TypeError) as e:
        cli.fail(ap, str(e))
    print(table(cfg))


if __name__ == "__main__":
    main()
