"""Latents of audio for downstream use: one file, or a whole corpus mirrored into a folder.

    python -m wavenet_ae.encode --run-dir DIR --input FILE --out latents.npy [--codes-out codes.npy]
    python -m wavenet_ae.encode --run-dir DIR --input CORPUS_DIR_OR_MANIFEST --out OUT_DIR
        [--input-root DIR] [--batch-size 16] [--overwrite] [--format npy|zerospeech]
        [--zerospeech-codes embedding|onehot] [--zerospeech-benchmark abxLS|abx17]
    torchrun --nproc_per_node K -m wavenet_ae.encode ...      (the same command, sharded over K ranks)

**Latents.** (M, n_latent) float32, M = ceil(T / hop): latent m describes the wav segment
[m * hop, (m + 1) * hop) (hop = 320 samples = 20 ms at 16 kHz): the signal is zero-padded so that the
encoder's field of latent m is centred on that segment. Evaluation mode: VAE means, VQ-VAE quantised
vectors (exactly the codebook rows of the codes); for a VQ-VAE the code indices (M,) int64 are written too (single file: default
`<out stem>.codes.npy`). Audio is read, mixed to mono and resampled as for training
(`data.corpus.load_audio`).

**A corpus** (`--input` a folder or a manifest, `--out` a folder). The files are those of a training
corpus: a folder's audio files (`data.corpus.AUDIO_EXTENSIONS`) at any depth, symbolic links to folders
followed (`data.corpus.walk_corpus`), or the lines of a manifest `path<TAB>speaker` (relative paths are
relative to the manifest's folder; `python -m wavenet_ae.data.manifest` writes one). Each utterance
`REL/name.ext` gives

    OUT/REL/name.npy           latents, float32 (M, n_latent)
    OUT/REL/name.codes.npy     VQ-VAE code indices, int64 (M,) (not with --format zerospeech)

where REL/name.ext is the file's path relative to the input folder (for a manifest: to `--input-root`,
default the manifest's folder). **Paths never leave OUT**: a manifest entry (relative with `..`, or
absolute) is normalised lexically (`os.path.normpath`, links not resolved) and must then lie under the
input root; otherwise nothing is encoded and the command fails with one line naming the manifest line
(`manifest.tsv:7: ../../etc/x.flac is not under /data/corpus ...`; pass `--input-root` to a folder above
all the entries, e.g. the LibriSpeech root for a manifest of absolute paths). Two entries that would
write the same output file are refused the same way.

Batches: utterances are sorted by length and encoded `--batch-size` at a time, each padded to the
longest of its batch and its result cut to its own M; the encoder has a finite field (valid
convolutions) and latent m < M reads only the utterance's own padded samples, so the result equals
encoding the file alone (`encode_signals` / `encode_signal`). Unreadable or corrupt files are skipped
with one warning line each and counted in the summary.

Resume: every output is written to a temporary file in its folder and renamed into place
(`checkpoint.atomic_write`), so an output file that exists is complete; a rerun skips the utterances
whose outputs exist (reporting how many) and encodes the rest; `--overwrite` redoes them all.

Under torchrun (WORLD_SIZE / RANK set) rank r encodes the files i with i % WORLD_SIZE == r (i: the
file's index in the walk or the manifest); the ranks meet once at the end (a gloo process group), after
which rank 0 writes the corpus-level files.

**--format zerospeech**: a submission for the ZeroSpeech toolkit (`zerospeech-benchmarks`, import name
`zerospeech`): one float64 2-D array per utterance, `OUT/REL/name.npy` (the toolkit finds them with
`rglob('*.npy')` and matches them to the dataset's audio by file stem; so encode the LibriSpeech root
whose `dev-clean/`, `dev-other/`, ... folders become OUT's), no codes files, and in OUT:

    meta.yaml      the toolkit's MetaFile: benchmark_name, model_info (system_description with the
                   bitrate, train_set), publication (authors / institution left empty: fill them in),
                   open_source
    params.yaml    the ABX parameters (ABX2Parameters for abxLS, ABXParameters for abx17) with
                   feature_size = hop / sample_rate = 0.02 s and score_file_type '.npy'

`--zerospeech-codes embedding` (default) writes the latents (for a VQ-VAE the quantised code vectors),
`onehot` (VQ-VAE only) the codes as one-hot rows (M, n_codes).

**Bitrate** (VQ-VAE, either format): ZeroSpeech 2019's definition, as its toolkit computes it
(zerospeech2020/evaluation/bitrate.py): every latent frame is one symbol (consecutive repeats are
*not* merged), p(s) = the share of symbol s among all N frames of the output, H = -sum p(s) log2 p(s),
D = the total duration of the encoded audio in seconds, bitrate = N * H / D bits/s. Printed, written to
`OUT/bitrate.json`, and quoted in meta.yaml's system_description.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .rfield import chain_field, encoder_layers, featurizer_layers

BITRATE_NAME = "bitrate.json"
ZEROSPEECH_BENCHMARKS = ("abxLS", "abx17")


def encoder_field(m) -> int:
    """Wav samples one latent reads (MFCC window + deltas + encoder convs)."""
    return chain_field(featurizer_layers(m) + encoder_layers(m))


def encode_padding(m, n_samples: int) -> tuple[int, int, int]:
    """(left, right, M): the zeros around a signal of n_samples so that latent k's field is centred on
    [k * hop, (k + 1) * hop), for its M = ceil(n_samples / hop) latents (right < 0: samples to spare)."""
    if n_samples == 0:
        raise ValueError("empty signal")
    hop, f = m.hop, encoder_field(m)
    M = math.ceil(n_samples / hop)
    left = max(0, (f - hop) // 2)
    return left, (M - 1) * hop + f - left - n_samples, M


def _padded(wav: np.ndarray, m) -> tuple[np.ndarray, int]:
    """The signal zero-padded as `encode_padding` says, and M."""
    left, right, M = encode_padding(m, len(wav))
    return np.concatenate([np.zeros(left, np.float32), np.asarray(wav, np.float32),
                           np.zeros(max(0, right), np.float32)]), M


@torch.no_grad()
def encode_signals(model, wavs: list[np.ndarray], batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """[wav (T_i,) at the model rate] -> [(latents (M_i, n_latent) float32, codes (M_i,) int64 or None)],
    in the order given. Sorted by length, `batch_size` signals a forward, each zero-padded on the right
    to the longest of its batch: latent k < M_i reads only samples of signal i's own padded signal
    (valid convolutions), so the padding changes nothing (equal to one signal a forward up to float
    rounding of the batched convolutions)."""
    from .features import mfcc_features
    m = model.cfg
    model.eval()
    dev = next(model.parameters()).device
    padded = [_padded(w, m) for w in wavs]
    order = sorted(range(len(wavs)), key=lambda i: len(padded[i][0]))
    out: list = [None] * len(wavs)
    for b in range(0, len(order), max(1, batch_size)):
        idx = order[b: b + max(1, batch_size)]
        L = max(len(padded[i][0]) for i in idx)
        x = np.zeros((len(idx), L), np.float32)                         # (B, L)
        for row, i in enumerate(idx):
            x[row, :len(padded[i][0])] = padded[i][0]
        feats = mfcc_features(torch.from_numpy(x).to(dev), m)           # (B, n_in, F), on the model's device
        z, terms = model.encode(feats)                                  # (B, n_latent, M_max)
        codes = terms.get("codes")
        if codes is not None:
            # the codebook rows themselves: the straight-through z_e + (e - z_e) differs from e by rounding,
            # and a frame's vector must name its code exactly (ZeroSpeech counts distinct rows as symbols)
            z = F.embedding(codes, model.bottleneck.codebook).transpose(1, 2)
        z = z.transpose(1, 2).float().cpu().numpy()
        codes = None if codes is None else codes.cpu().numpy()
        for row, i in enumerate(idx):
            M = padded[i][1]
            if z.shape[1] < M:
                raise RuntimeError(f"internal: encoder gave {z.shape[1]} latents for {M} segments")
            out[i] = (np.ascontiguousarray(z[row, :M], dtype=np.float32),
                      None if codes is None else codes[row, :M].astype(np.int64))
    return out


def has_codes(model) -> bool:
    """Whether encoding gives codes: a VQ-VAE past its warm-up (before it, latents are unquantised)."""
    return model.cfg.bottleneck == "vqvae" and not model.bottleneck.in_warmup()


def encode_signal(model, wav: np.ndarray):
    """wav (T,) float at the model rate -> latents (M, n_latent) float32 and codes (M,) int64 or None."""
    return encode_signals(model, [wav], batch_size=1)[0]


# --- the corpus: which files, and where their outputs go -------------------------------------------

class EncodeError(ValueError):
    """A corpus that cannot be encoded as asked (the message names the file or manifest line)."""


@dataclass(frozen=True)
class Item:
    src: str          # the audio file, as opened
    rel: str          # its path relative to the input root, '/'-separated: OUT/rel minus suffix + .npy
    where: str        # for messages: the file, or MANIFEST:LINE


def _under(path: str, root: str) -> str | None:
    """`path` relative to `root` (both absolute, normalised), or None when it is not below it."""
    rel = os.path.relpath(path, root)
    return None if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def list_corpus(source: str | Path, input_root: str | Path | None = None) -> tuple[list[Item], int]:
    """(utterances in walk / manifest order, number of non-audio files left out) of a folder or a
    manifest. Raises EncodeError for a manifest entry outside the input root or a malformed line."""
    from .data.corpus import AUDIO_EXTENSIONS, walk_corpus
    source = Path(source)
    items, other = [], 0
    if source.is_dir():
        if input_root is not None:
            raise EncodeError("--input-root applies to a manifest; a folder's outputs mirror the folder")
        top = sorted(e.name for e in os.scandir(source) if e.is_file())      # walk_corpus starts one level down
        found = [(str(source / n), n) for n in top if not n.endswith(".tsv")]
        prefix = len(os.path.join(str(source), ""))
        found += [(p, p[prefix:]) for p, _ in walk_corpus(source, speaker_level=1)]
        for path, rel in found:
            if path.lower().endswith(AUDIO_EXTENSIONS):
                items.append(Item(path, rel.replace(os.sep, "/"), path))
            else:
                other += 1
        return items, other
    if not source.is_file():
        raise EncodeError(f"input {source} does not exist")
    # the manifest format of data.corpus (read here with line numbers, for the messages)
    root = os.path.normpath(os.path.abspath(input_root if input_root is not None else source.parent))
    base = os.path.abspath(source.parent)
    try:
        with open(source, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            rows = list(enumerate(csv.reader(fh, delimiter="\t"), 1))
    except (OSError, csv.Error) as e:
        raise EncodeError(f"cannot read the manifest {source}: {e}") from e
    for n, row in rows:
        if not row or row[0].startswith("#") or (n == 1 and row[:2] == ["path", "speaker"]):
            continue
        where = f"{source}:{n}"
        if len(row) < 2:
            raise EncodeError(f"{where}: expected 'path<TAB>speaker', got {row!r}")
        full = os.path.normpath(os.path.join(base, row[0]))       # an absolute entry stays itself
        rel = _under(full, root)
        if rel is None:
            raise EncodeError(f"{where}: {row[0]} is not under {root}, so its output would fall outside "
                              f"--out; nothing encoded (use --input-root DIR with a folder above every entry)")
        if full.lower().endswith(AUDIO_EXTENSIONS):
            items.append(Item(str(Path(row[0]) if os.path.isabs(row[0]) else source.parent / row[0]),
                              rel.replace(os.sep, "/"), where))
        else:
            other += 1
    return items, other


def output_paths(out: Path, item: Item, with_codes: bool) -> tuple[Path, Path | None]:
    stem = item.rel.rsplit(".", 1)[0]
    return out / f"{stem}.npy", (out / f"{stem}.codes.npy") if with_codes else None


def _check_collisions(items: list[Item], out: Path, with_codes: bool) -> None:
    seen: dict[Path, Item] = {}
    for it in items:
        for p in output_paths(out, it, with_codes):
            if p is None:
                continue
            if p in seen:
                raise EncodeError(f"{seen[p].where} and {it.where} would both write {p}; nothing encoded")
            seen[p] = it


# --- writing ---------------------------------------------------------------------------------------

def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _save(path: Path, a: np.ndarray) -> None:
    from .checkpoint import atomic_write
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _npy_bytes(a))


def _done(lat: Path, codes: Path | None) -> bool:
    # the latents are written last: when they exist, the codes do (unless deleted since)
    return lat.is_file() and (codes is None or codes.is_file())


def _remove_stale_temps(written: list[Path]) -> None:
    """Temporary files of outputs this process wrote, left by an earlier process killed mid-write
    (`.NAME.tmp-PID`); only our own outputs' names, so other ranks' writes in progress are untouched."""
    by_dir: dict[Path, set[str]] = {}
    for p in written:
        by_dir.setdefault(p.parent, set()).add(p.name)
    mine = f".tmp-{os.getpid()}"
    for d, names in by_dir.items():
        try:
            for e in os.scandir(d):
                if e.name.startswith(".") and ".tmp-" in e.name and not e.name.endswith(mine) \
                        and e.name[1:].rsplit(".tmp-", 1)[0] in names:
                    os.unlink(e.path)
        except OSError:
            pass


# --- ZeroSpeech --------------------------------------------------------------------------------------

def zr2019_bitrate(counts: Counter, seconds: float) -> dict:
    """ZeroSpeech 2019's bitrate: N frames (every frame a symbol, repeats not merged), H the entropy in
    bits of the symbol distribution over all of them, D seconds of audio: N * H / D bits/s."""
    n = sum(counts.values())
    if n == 0 or seconds <= 0:
        return {"bits_per_second": 0.0, "entropy_bits": 0.0, "symbols": n, "distinct_symbols": len(counts),
                "seconds": seconds}
    p = np.array(list(counts.values()), np.float64) / n
    h = float(-(p * np.log2(p)).sum())
    return {"bits_per_second": n * h / seconds, "entropy_bits": h, "symbols": n,
            "distinct_symbols": len(counts), "seconds": seconds, "symbols_per_second": n / seconds,
            "definition": "ZeroSpeech 2019: N * H / D, every frame a symbol (repeats not merged), "
                          "H the entropy (bits) of the symbols over the whole output, D its audio seconds"}


def _frame_symbols(lat: Path, codes: Path | None) -> np.ndarray:
    """One symbol per frame of an output: the code indices, or (zerospeech) the rows themselves, as
    the ZR2019 toolkit takes each line of a feature file as a symbol."""
    if codes is not None:
        return np.load(codes)
    a = np.load(lat)
    return np.ascontiguousarray(a).view(np.dtype((np.void, a.dtype.itemsize * a.shape[1])))[:, 0]


def _audio_seconds(path: str) -> float:
    import soundfile as sf
    info = sf.info(path)
    return info.frames / info.samplerate


def zerospeech_params(benchmark: str, feature_size: float) -> dict:
    """params.yaml: the toolkit's parameter model for the benchmark, as its `export` writes it
    (zerospeech/tasks/abx/abxLS_phoneme/params.py ABX2Parameters, abx_librispeech/params.py
    ABXParameters), with our frame size."""
    common = {"cuda": True, "feature_size": feature_size, "distance_mode": "cosine", "max_size_group": 10,
              "max_x_across": 5, "score_file_type": ".npy"}
    if benchmark == "abxLS":
        return {**common, "speaker_mode": "all", "context": "all", "seed": 3459,
                "result_filename": "score_all_phonetic"}
    return {**common, "mode": "all", "result_filename": "scores.csv"}


def zerospeech_meta(benchmark: str, description: str, train_set: str) -> dict:
    """meta.yaml: the toolkit's MetaFile (zerospeech/submissions/_model/meta_file.py); the fields only
    the authors can fill are left empty."""
    import datetime
    return {"username": None, "submission_id": None, "benchmark_name": benchmark,
            "model_info": {"model_id": None, "system_description": description, "train_set": train_set,
                           "gpu_budget": None},
            "publication": {"author_label": "", "authors": "", "paper_title": None, "paper_url": None,
                            "publication_year": datetime.date.today().year, "bib_reference": None,
                            "DOI": None, "institution": "", "team": None},
            "open_source": True, "code_url": None}


def _write_yaml(path: Path, obj: dict) -> None:
    import yaml
    from .checkpoint import atomic_write
    atomic_write(path, yaml.safe_dump(obj, sort_keys=False).encode())


# --- the corpus run ----------------------------------------------------------------------------------

@dataclass
class Summary:
    encoded: int = 0
    skipped_done: int = 0
    failed: int = 0
    frames: int = 0


def _dist_env() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < max(world, 1):
        raise EncodeError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return world, rank


def encode_corpus(run, items: list[Item], out: Path, *, batch_size: int = 16, overwrite: bool = False,
                  fmt: str = "npy", zerospeech_codes: str = "embedding", world: int = 1, rank: int = 0,
                  progress: bool | None = None) -> Summary:
    """Encode this rank's share of `items` into `out` (see the module docstring); returns its counts."""
    from tqdm.auto import tqdm
    from .data.corpus import load_or_skip
    m = run.config.model
    with_codes = has_codes(run.model) and fmt == "npy"
    todo = []
    s = Summary()
    for i, it in enumerate(items):
        if i % world != rank:
            continue
        lat, codes = output_paths(out, it, with_codes)
        if not overwrite and _done(lat, codes):
            s.skipped_done += 1
        else:
            todo.append(it)

    def frames_of(it: Item) -> int:           # sorting key only: lengths from the headers
        try:
            return int(_audio_seconds(it.src) * m.sample_rate)
        except Exception:  # noqa: BLE001  (unreadable: load_or_skip says so below)
            return 0
    with ThreadPoolExecutor(8) as pool:
        lengths = list(pool.map(frames_of, todo))
    todo = [it for _, it in sorted(zip(lengths, todo), key=lambda x: x[0])]
    written: list[Path] = []
    delay = float(os.environ.get("WAVENET_AE_TEST_ENCODE_DELAY", "0"))     # lets tests kill mid-run
    codebook = run.model.bottleneck.codebook.detach().cpu().numpy() if m.bottleneck == "vqvae" else None
    with tqdm(total=len(todo), unit="file", desc=f"encode[{rank}]" if world > 1 else "encode",
              disable=None if progress is None else not progress, file=sys.stderr) as bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b: b + batch_size]
            wavs = [(it, load_or_skip(it.src, m.sample_rate)) for it in batch]
            bad = [it for it, w in wavs if w is None or len(w) == 0]
            s.failed += len(bad)
            good = [(it, w) for it, w in wavs if w is not None and len(w)]
            for (it, _), (z, c) in zip(good, encode_signals(run.model, [w for _, w in good], batch_size)):
                lat, codes_path = output_paths(out, it, with_codes)
                if fmt == "zerospeech":
                    if zerospeech_codes == "onehot":
                        z = np.eye(codebook.shape[0], dtype=np.float64)[c]
                    z = z.astype(np.float64)
                elif codes_path is not None:
                    _save(codes_path, c)
                    written.append(codes_path)
                _save(lat, z)                        # last: its existence marks the utterance done
                written.append(lat)
                s.encoded += 1
                s.frames += len(z)
            bar.update(len(batch))
            if delay:
                time.sleep(delay)
    _remove_stale_temps(written)
    return s


def _corpus_bitrate(items: list[Item], out: Path, with_codes: bool) -> dict:
    counts: Counter = Counter()
    seconds = 0.0
    for it in items:
        lat, codes = output_paths(out, it, with_codes)
        if not lat.is_file():
            continue                       # skipped (unreadable)
        sym, n = np.unique(_frame_symbols(lat, codes), return_counts=True)
        counts.update(dict(zip(sym.tolist(), n.tolist())))
        seconds += _audio_seconds(it.src)
    return zr2019_bitrate(counts, seconds)


def _main_corpus(ap, a, cli, run) -> int:
    m = run.config.model
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        cli.fail(ap, f"--out {out} is a file; a folder or a manifest as --input needs a folder as --out")
    if a.zerospeech_codes == "onehot" and m.bottleneck != "vqvae":
        cli.fail(ap, f"--zerospeech-codes onehot needs a VQ-VAE; this run's bottleneck is {m.bottleneck}")
    try:
        world, rank = _dist_env()
        items, other = list_corpus(a.input, a.input_root)
        if not items:
            raise EncodeError(f"no audio files ({', '.join(_exts())}) in {a.input}")
        quantised = has_codes(run.model)
        if a.format == "zerospeech" and a.zerospeech_codes == "onehot" and m.bottleneck == "vqvae" and not quantised:
            raise EncodeError(f"{run.dir} is still in its VQ warm-up (step {run.step} <= vq_warmup_steps="
                              f"{m.vq_warmup_steps}): no codes yet; use --zerospeech-codes embedding")
        with_codes = quantised and a.format == "npy"
        _check_collisions(items, out, with_codes)
    except EncodeError as e:
        cli.fail(ap, str(e))
    group = False
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")     # only to meet at the end: CPU is enough
        group = True
    out.mkdir(parents=True, exist_ok=True)
    try:
        s = encode_corpus(run, items, out, batch_size=a.batch_size, overwrite=a.overwrite, fmt=a.format,
                          zerospeech_codes=a.zerospeech_codes, world=world, rank=rank,
                          progress=False if a.no_progress else None)
    except EncodeError as e:
        cli.fail(ap, str(e))
    if group:
        import torch.distributed as dist
        t = torch.tensor([s.encoded, s.skipped_done, s.failed, s.frames], dtype=torch.long)
        dist.all_reduce(t)                  # also the barrier: every rank's files are written
        s = Summary(*t.tolist())
    msg = (f"{out}: encoded {s.encoded} files ({s.frames} latents, {m.bottleneck}, step {run.step}), "
           f"skipped {s.skipped_done} already done, {s.failed} unreadable"
           + (f"; left out {other} non-audio files" if other else "")
           + (f" ({world} ranks)" if world > 1 else ""))
    if rank == 0:
        print(msg, file=sys.stderr)
        if quantised:
            br = _corpus_bitrate(items, out, with_codes)
            from .checkpoint import atomic_write
            atomic_write(out / BITRATE_NAME, (json.dumps(br, indent=1) + "\n").encode())
            print(f"bitrate (ZeroSpeech 2019): {br['bits_per_second']:.2f} bits/s "
                  f"({br['entropy_bits']:.3f} bits x {br['symbols']} frames / {br['seconds']:.2f} s) "
                  f"-> {out / BITRATE_NAME}", file=sys.stderr)
        if a.format == "zerospeech":
            desc = (f"wavenet_ae {m.bottleneck} latents ({a.zerospeech_codes}), {m.sample_rate / m.hop:g} Hz, "
                    f"run {run.dir.name} step {run.step}")
            if quantised:
                desc += f"; bitrate {br['bits_per_second']:.2f} bits/s (ZeroSpeech 2019 definition)"
            train_set = _train_set(run.dir)
            _write_yaml(out / "meta.yaml", zerospeech_meta(a.zerospeech_benchmark, desc, train_set))
            _write_yaml(out / "params.yaml", zerospeech_params(a.zerospeech_benchmark, m.hop / m.sample_rate))
            print(f"wrote {out / 'meta.yaml'} and params.yaml (feature_size {m.hop / m.sample_rate:g} s); before "
                  f"submitting, fill in meta.yaml's publication.authors, publication.institution"
                  + ("" if train_set else " and model_info.train_set"), file=sys.stderr)
    if group:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _train_set(run_dir: Path) -> str:
    """The corpus the run was trained on, as its index cache names it ('' when unknown)."""
    from .data.corpus import INDEX_CACHE_NAME
    try:
        with open(run_dir / INDEX_CACHE_NAME, encoding="utf-8") as fh:
            return str(json.loads(fh.readline().split(" ", 5)[5]).get("source", ""))
    except (OSError, IndexError, ValueError, AttributeError):
        return ""


def _exts() -> tuple[str, ...]:
    from .data.corpus import AUDIO_EXTENSIONS
    return AUDIO_EXTENSIONS


def main(argv: list[str] | None = None) -> int:
    from . import cli
    ap = cli.parser("encode", "Encode a wav file, or every file of a folder or manifest, into latents (.npy) "
                              "with a trained run.")
    cli.add_run_dir(ap)
    ap.add_argument("--input", required=True,
                    help="an audio file (resampled to the model rate), or a folder / manifest TSV of them")
    ap.add_argument("--out", required=True,
                    help="latents .npy, shape (M, n_latent); for a folder or manifest: the output folder")
    ap.add_argument("--codes-out", help="one file: VQ-VAE code indices .npy (default: <out stem>.codes.npy)")
    ap.add_argument("--input-root", help="manifest: outputs mirror the paths relative to this folder "
                                         "(default: the manifest's folder); entries outside it are refused")
    ap.add_argument("--batch-size", type=int, default=16, help="utterances a forward (default 16)")
    ap.add_argument("--overwrite", action="store_true", help="re-encode files whose outputs exist")
    ap.add_argument("--format", default="npy", choices=["npy", "zerospeech"],
                    help="zerospeech: float64 arrays + meta.yaml/params.yaml for the ZeroSpeech toolkit")
    ap.add_argument("--zerospeech-codes", default="embedding", choices=["embedding", "onehot"],
                    help="VQ-VAE: the quantised vectors (default) or one-hot codes (M, n_codes)")
    ap.add_argument("--zerospeech-benchmark", default="abxLS", choices=ZEROSPEECH_BENCHMARKS,
                    help="meta.yaml's benchmark_name and the params.yaml it reads (default abxLS)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_device(ap)
    a = ap.parse_args(argv)
    a.device = cli.resolve_device(ap, a.device)
    if a.batch_size < 1:
        cli.fail(ap, f"--batch-size must be >= 1, got {a.batch_size}")

    from .data.corpus import CorpusError, load_audio
    from .run_dir import RunDirError, load_run

    def fail(msg: str) -> int:
        cli.fail(ap, msg)

    if not Path(a.input).exists():
        return fail(f"input {a.input} does not exist")
    try:
        run = load_run(a.run_dir, a.device)
    except RunDirError as e:
        return fail(str(e))
    if not Path(a.input).is_file() or a.input.lower().endswith((".tsv", ".txt")):
        return _main_corpus(ap, a, cli, run)
    if a.format != "npy" or a.input_root:
        return fail("--format zerospeech and --input-root apply to a folder or manifest as --input")
    try:
        wav = load_audio(a.input, run.config.model.sample_rate)
    except CorpusError as e:
        return fail(f"cannot read input: {e}")
    m = run.config.model
    latents, codes = encode_signal(run.model, wav)
    out = Path(a.out)
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")     # np.save's naming
    _save(out, latents)
    msg = (f"wrote {out}: latents {latents.shape} ({m.sample_rate / m.hop:g} per second, "
           f"{m.bottleneck}, step {run.step})")
    if codes is not None:
        codes_out = Path(a.codes_out) if a.codes_out else out.with_name(out.name.removesuffix(".npy") + ".codes.npy")
        codes_out = codes_out if codes_out.suffix == ".npy" else codes_out.with_name(codes_out.name + ".npy")
        _save(codes_out, codes)
        msg += f"; codes {codes.shape} -> {codes_out}"
    print(msg, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
