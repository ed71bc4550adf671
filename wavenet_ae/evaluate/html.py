"""report.html: the evaluation report as one self-contained page, to open in a browser or send by mail.

Figures are embedded as base64 PNG data URIs and audio as base64 WAV (16-bit PCM) data URIs, the CSS is
inline, and there is no script and no external reference. Every string that comes from the run (paths,
speaker and file names, config values) is escaped.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import soundfile as sf

# Longer clips are cut to this in the page (the wav files beside it keep all): a report to mail
# stays small (16 kHz 16-bit: 32 kB per second, 43 kB base64).
MAX_EMBED_SECONDS = 10.0

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ccc; padding: .25em .7em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-size: .9em; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; margin: 1em 0; }
.player { display: inline-block; margin: .3em 1.5em .3em 0; vertical-align: top; }
.player span { display: block; font-size: .9em; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def wav_data_uri(path: Path, max_seconds: float = MAX_EMBED_SECONDS) -> tuple[str, float]:
    """(data URI of the first `max_seconds` of the audio file as 16-bit PCM WAV, its seconds)."""
    info = sf.info(str(path))
    x, sr = sf.read(str(path), frames=int(max_seconds * info.samplerate), dtype="float32", always_2d=True)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return data_uri("audio/wav", buf.getvalue()), len(x) / sr


def _img(path: Path, caption: str) -> str:
    return (f'<figure><img alt="{_e(caption)}" src="{data_uri("image/png", path.read_bytes())}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    num = lambda c: c.replace(".", "", 1).replace("-", "", 1).isdigit()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if num(c) else f"<td>{_e(c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _config_summary(cfg: dict) -> str:
    m = cfg.get("model", {})
    parts = [f"preset {cfg.get('preset', '?')}", f"{m.get('bottleneck', '?')} bottleneck",
             f"{m.get('n_latent', '?')}-dim latents"]
    if m.get("bottleneck") == "vqvae":
        parts.append(f"{m.get('n_codes', '?')} codes")
    parts += [f"{m.get('sample_rate', '?')} Hz audio",
              f"decoder {m.get('n_blocks', '?')} × {m.get('n_block_layers', '?')} layers, "
              f"{m.get('n_res', '?')} residual channels",
              f"{len(m.get('lc_upsample_strides', []))} upsampling layers"]
    details = "".join(f"<h3>{_e(section)}</h3>" + _table(["key", "value"], [[k, str(v)] for k, v in values.items()])
                      for section, values in cfg.items() if isinstance(values, dict))
    return (f"<p>{_e(', '.join(parts))}.</p>"
            f"<details><summary>Full configuration (config.json)</summary>{details}</details>")


def _figures(report_dir: Path, run_dir: Path) -> list[Path]:
    """The training curves of the run dir and the report's pictures (per-sample spectrograms go with the
    audio), loss curves first; a run dir picture the report copied appears once."""
    own = [p for p in sorted(report_dir.glob("*.png")) if not p.name.endswith("_spectrograms.png")]
    run = [p for p in sorted(run_dir.glob("*.png")) if not (report_dir / p.name).exists()]
    return sorted(run + own, key=lambda p: (not p.name.startswith("loss"), p.name))


def _sample(e: dict, report_dir: Path) -> str:
    roles = [("input", f"input (speaker {e['speaker']})", "input"),
             ("resynth", f"resynthesis (speaker {e['speaker']})", "resynthesis"),
             ("conversion", f"converted to speaker {e['target_speaker']}", "conversion")]
    players = []
    for key, label, role in roles:
        name = e["audio"][key]
        uri, seconds = wav_data_uri(report_dir / name)
        players.append(f'<div class="player"><span>{_e(label)}</span>'
                       f'<audio controls preload="metadata" data-role="{role}" data-file="{_e(name)}" '
                       f'data-seconds="{seconds:.3f}" src="{uri}"></audio></div>')
    spec = report_dir / e.get("spectrograms", "")
    return (f'<div class="sample"><h3>{_e(Path(e["file"]).name)}</h3><p class="note">{_e(e["file"])}: '
            f'MCD of the resynthesis {e["mcd_db"]:.2f} dB, of the conversion {e["mcd_conversion_db"]:.2f} dB.</p>'
            + "".join(players) + (_img(spec, f"spectrograms of {Path(e['file']).name}") if spec.is_file() else "")
            + "</div>")


def render(report: dict, tables: list, report_dir: str | Path) -> str:
    """The page of `report` (run_evaluation's dict) with its `tables` (report.report_tables), reading the
    pictures and audio files that `report_dir` holds and the training curves of the run dir."""
    report_dir = Path(report_dir)
    r, run_dir = report, Path(report["run_dir"])
    parts = [f"<h1>Evaluation of {_e(run_dir)}</h1>",
             _table(["run dir", "step", "bottleneck", "held-out files", "probe training files"],
                    [[str(run_dir), str(r["step"]), r["bottleneck"], str(r["n_held_out_files"]),
                      str(r["n_probe_train_files"])]])]
    if r.get("config"):
        parts.append(_config_summary(r["config"]))
    for t in tables:
        parts.append(f"<h2>{_e(t.title)}</h2>")
        if t.header:
            parts.append(_table(t.header, t.rows))
        parts += [f'<p class="note">{_e(n)}</p>' for n in t.notes]
    if r.get("resynthesis"):
        parts.append("<h2>Listen: input, resynthesis, voice conversion</h2>")
        parts.append(f'<p class="note">The first {MAX_EMBED_SECONDS:g} s of each clip at most; the wav files '
                     f"lie beside this page.</p>")
        parts += [_sample(e, report_dir) for e in r["resynthesis"] if "audio" in e]
    figs = _figures(report_dir, report_dir.parent)      # the report lies in RUN_DIR/report
    if figs:
        parts.append("<h2>Figures</h2>")
        parts += [_img(p, p.name) for p in figs]
    title = f"Evaluation of {run_dir.name} (step {r['step']})"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
