"""Corpus index: which audio files, which speaker, how long, and which were rejected and why.

A corpus is a directory (speaker = the folder `speaker_level` deep: 1 = first-level folder, 2 = the
second, as in a LibriSpeech root `subset/speaker/chapter/utt.flac`; symbolic links to folders are
followed) or a manifest TSV `path<TAB>speaker` (paths relative to the manifest; a `path\tspeaker`
header line is allowed; `python -m wavenet_ae.data.manifest` writes one). Headers are checked up
front (missing, unreadable, unknown extension, no channels, empty, too short); the content
(NaN/inf, decoding errors) is checked when a file is loaded. Every rejected file gets one warning
line naming it and the reason, and the index keeps a summary.

Indexing a large corpus reads every file's header (a thread pool does it, in parallel); with
`cache=PATH` the index is kept in a TSV file (`INDEX_CACHE_NAME` in a run directory) and a later
call reads again only the headers of files that are new or whose size or mtime changed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SPLITS = ("train", "valid", "test")      # the split names `split.tsv` may use
NOT_AUDIO = (".tsv", ".txt", ".md", ".json")   # files a directory walk leaves out without a warning
INDEX_CACHE_NAME = "index.tsv"           # the index cache's name in a run directory
LIBRISPEECH_SUBSETS = frozenset({"train-clean-100", "train-clean-360", "train-other-500", "dev-clean",
                                 "dev-other", "test-clean", "test-other"})
PROGRESS_MIN_FILES = 2000                # a progress bar (on a terminal) from this many files to check


class CorpusError(ValueError):
    pass


class BadAudioError(CorpusError):
    """A file whose content cannot be used (`load_audio`); `path` and `reason` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class CorpusWarning(UserWarning):
    """Something in the corpus is not used; shown as one line, `warning: ...`."""


class BadAudioWarning(CorpusWarning):
    """One skipped file: `warning: skipping PATH: reason`."""


_formatwarning = warnings.formatwarning


def _format_bad_audio(message, category, filename, lineno, line=None):
    # Python's format echoes the source line that warned: noise when a corpus skips thousands of files
    if isinstance(category, type) and issubclass(category, CorpusWarning):
        return f"warning: {message}\n"
    return _formatwarning(message, category, filename, lineno, line)


warnings.formatwarning = _format_bad_audio


def warn_skip(path: str, reason: str) -> None:
    """The one warning every stage gives for a file it skips."""
    warnings.warn(f"skipping {path}: {reason}", BadAudioWarning, stacklevel=3)


@dataclass(frozen=True)
class Utterance:
    path: str
    speaker: str
    n_samples: int          # at the model rate, after resampling


@dataclass
class Corpus:
    utterances: list[Utterance]
    speakers: list[str]                  # id -> name (sorted names)
    rejected: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)

    def speaker_id(self, name: str) -> int:
        try:
            return self.speakers.index(name)
        except ValueError:
            raise KeyError(f"unknown speaker {name!r}; known: {', '.join(self.speakers)}") from None

    def summary(self) -> str:
        reasons = Counter(r.split(":")[0] for _, r in self.rejected)
        samples = sum(u.n_samples for u in self.utterances)
        text = f"{len(self.utterances)} files, {len(self.speakers)} speakers, {samples} samples"
        if self.rejected:
            text += f"; skipped {len(self.rejected)}: " + ", ".join(f"{k} {v}" for k, v in reasons.items())
        return text

    def split(self, valid_fraction: float, seed: int = 0) -> tuple["Corpus", "Corpus"]:
        """Deterministic held-out split by file (hash of path), at least one training file."""
        def score(u: Utterance) -> float:
            h = hashlib.sha1(f"{seed}:{u.path}".encode()).digest()
            return int.from_bytes(h[:8], "big") / 2 ** 64
        valid = [u for u in self.utterances if score(u) < valid_fraction]
        train = [u for u in self.utterances if score(u) >= valid_fraction]
        if not train:
            train, valid = valid, []
        return Corpus(train, self.speakers), Corpus(valid, self.speakers)


def _reject(rejected: list, path: str, reason: str) -> None:
    warn_skip(path, reason)
    rejected.append((path, reason))


def walk_corpus(root: str | Path, speaker_level: int = 1) -> list[tuple[str, str]]:
    """(path, speaker) of every file at least `speaker_level` folders below `root`, in the order of
    sorted paths, leaving out NOT_AUDIO names; speaker = the name of the folder `speaker_level` deep.
    Symbolic links to folders are followed; a link to a folder on its own path (a cycle) is skipped
    with a warning, and so is a folder that cannot be listed. A broken link is listed (indexing then
    rejects it as missing). Reads no file: only the folders are listed."""
    if speaker_level < 1:
        raise ValueError(f"speaker_level must be >= 1, got {speaker_level}")
    root = Path(root)
    top = str(root)
    prefix = "" if top == "." else os.path.join(top, "")      # the spelling str(root / rel) gives
    out: list[tuple[str, str]] = []

    def visit(folder: str, rel: str, depth: int, ancestors: frozenset) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)   # pre-order with sorted names = sorted paths
        except OSError as e:
            warnings.warn(f"skipping folder {folder}: {e.strerror or e}", CorpusWarning, stacklevel=4)
            return
        for e in entries:
            try:
                is_dir = e.is_dir()                          # follows a link
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    st = e.stat()
                except OSError as err:
                    warnings.warn(f"skipping folder {e.path}: {err.strerror or err}", CorpusWarning, stacklevel=4)
                    continue
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    warnings.warn(f"skipping {e.path}: a link to a folder that contains it "
                                  f"({os.path.realpath(e.path)})", CorpusWarning, stacklevel=4)
                    continue
                visit(e.path, rel + e.name + "/", depth + 1, ancestors | {key})
            elif depth >= speaker_level and not e.name.endswith(NOT_AUDIO) and (
                    e.is_file() or (e.is_symlink() and not os.path.exists(e.path))):
                out.append((prefix + rel + e.name, rel.split("/", speaker_level)[speaker_level - 1]))

    st = os.stat(top)
    visit(top, "", 0, frozenset({(st.st_dev, st.st_ino)}))
    return out


def _entries(source: Path, speaker_level: int = 1) -> list[tuple[str, str]]:
    if source.is_dir():
        return walk_corpus(source, speaker_level)
    if not source.is_file():
        raise CorpusError(f"corpus {source} does not exist")
    out = []
    with open(source, newline="") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter="\t"), 1):
            if not row or row[0].startswith("#") or (n == 1 and row[:2] == ["path", "speaker"]):
                continue
            if len(row) < 2:
                raise CorpusError(f"{source}:{n}: expected 'path<TAB>speaker', got {row!r}")
            p = Path(row[0])
            out.append((str(p if p.is_absolute() else source.parent / p), row[1]))
    return out


# --- reading headers -------------------------------------------------------------------------------
# A file's header, as the index keeps it: (size, mtime_ns, frames, samplerate, channels, error), the
# first two from os.stat (None: missing), the next three from libsndfile (None when `error`, the
# "unreadable: ..." reason, is set).

try:
    from soundfile import _ffi as _sf_ffi, _snd as _sf_lib
    _SFM_READ = _sf_lib.SFM_READ
except (ImportError, AttributeError):   # another soundfile layout: sf.info, serialised by its lock
    _sf_lib = None


class _OpenFailed(Exception):
    pass


_RETRY = "retry"        # a header's error: libsndfile could not open it; sf.info says why, after the pool


def _probe(path: str) -> tuple[int, int, int]:
    """(frames, samplerate, channels) of an audio file's header. Calls libsndfile's sf_open directly:
    sf.info holds soundfile's global open lock (a failed sf_open's error is global state), so threads
    calling it would read headers one at a time; without the lock they overlap. A file libsndfile
    cannot open raises _OpenFailed: `_read_headers` asks sf.info for the reason once no thread is
    opening files (the error message of an open running alongside could be another file's)."""
    if _sf_lib is None:
        i = sf.info(path)
        return i.frames, i.samplerate, i.channels
    info = _sf_ffi.new("SF_INFO*")
    handle = _sf_lib.sf_open(os.fsencode(path), _SFM_READ, info)   # releases the GIL
    if handle == _sf_ffi.NULL:
        raise _OpenFailed(path)
    _sf_lib.sf_close(handle)
    return info.frames, info.samplerate, info.channels


def _read_header(path: str, cached: dict | None) -> tuple:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return (None, None, None, None, None, None)
    if not stat.S_ISREG(st.st_mode):
        return (None, None, None, None, None, None)
    stamp = (st.st_size, st.st_mtime_ns)
    old = cached.get(path) if cached else None
    if old is not None and old[:2] == stamp and (old[2] is not None or old[5]):
        return old
    try:
        return (*stamp, *_probe(path), None)
    except _OpenFailed:
        return (*stamp, None, None, None, _RETRY)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for corrupt headers
        return (*stamp, None, None, None, f"unreadable: {e}")


def _soundfile_says(path: str) -> tuple:
    """(frames, samplerate, channels, None) or (None, None, None, "unreadable: <soundfile's error>")."""
    try:
        i = sf.info(path)
        return i.frames, i.samplerate, i.channels, None
    except Exception as e:
        return None, None, None, f"unreadable: {e}"


def _header_of(row: tuple) -> tuple:
    """The header of a row of the index (path, speaker, size, mtime_ns, frames, samplerate, channels,
    n_samples, reason): its reason is the header's error when the file was there but not readable."""
    size, mtime, frames, samplerate, channels = row[2:7]
    return size, mtime, frames, samplerate, channels, row[8] if size is not None and frames is None else None


def _judge(path: str, header: tuple, sample_rate: int, min_samples: int) -> tuple[int, str | None]:
    """(n_samples at `sample_rate`, None) for a usable file, (0, reason) for a rejected one."""
    if not path.lower().endswith(AUDIO_EXTENSIONS):
        return 0, f"unknown extension (expected {', '.join(AUDIO_EXTENSIONS)})"
    size, _, frames, samplerate, channels, error = header
    if size is None:
        return 0, "missing file"
    if error:
        return 0, error
    if channels < 1:
        return 0, f"bad channel count: {channels}"
    if frames <= 0:
        return 0, "zero-length"
    n = int(round(frames * sample_rate / samplerate))
    if n < min_samples:
        return 0, f"too short: {n} samples at {sample_rate} Hz, one window needs {min_samples}"
    return n, None


def _read_headers(paths: list[str], cached: dict | None, threads: int) -> list[tuple]:
    """`_read_header` of each path, in order; `threads` > 1: a thread pool over chunks of paths."""
    bar = None
    if len(paths) >= PROGRESS_MIN_FILES:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), desc="indexing", unit="file", disable=None, leave=False)
    try:
        if threads <= 1 or len(paths) < 256:
            out = []
            for k in range(0, len(paths), 256):
                out += [_read_header(p, cached) for p in paths[k:k + 256]]
                if bar is not None:
                    bar.update(len(paths[k:k + 256]))
        else:
            size = max(16, min(256, len(paths) // (8 * threads)))
            chunks = [paths[k:k + size] for k in range(0, len(paths), size)]
            with ThreadPoolExecutor(threads, thread_name_prefix="index") as pool:
                futures = {pool.submit(lambda c: [_read_header(p, cached) for p in c], c): len(c) for c in chunks}
                if bar is not None:
                    for f in as_completed(futures):
                        bar.update(futures[f])
                out = [h for f in futures for h in f.result()]      # in submission order: the paths'
    finally:
        if bar is not None:
            bar.close()
    return [(*h[:2], *_soundfile_says(p)) if h[5] is _RETRY else h for p, h in zip(paths, out)]


def default_threads() -> int:
    """Threads that read headers: more than cores, as reading a header mostly waits for the disk or
    the network file system when the files are not in the page cache."""
    return min(32, 4 * (os.cpu_count() or 1))


# --- the cache file --------------------------------------------------------------------------------
# `# wavenet_ae corpus index 1 {meta as JSON}`, a header line, then one row per entry of the corpus
# in its order (COLUMNS; an empty cell is unknown; tabs, newlines and backslashes escaped).

_CACHE_MAGIC = "# wavenet_ae corpus index"
_CACHE_VERSION = 1
_CACHE_COLUMNS = ("path", "speaker", "size", "mtime_ns", "frames", "samplerate", "channels", "n_samples",
                  "reason")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {v[1]: k for k, v in _ESCAPES.items()}


def _esc(text: str) -> str:
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return "".join(_ESCAPES.get(c, c) for c in text)
    return text


def _unesc(text: str) -> str:
    if "\\" not in text:
        return text
    return re.sub(r"\\(.)", lambda m: _UNESCAPES[m.group(1)], text)


class _CacheDamaged(ValueError):
    pass


def _cache_meta(source: Path, speaker_level: int, sample_rate: int, min_samples: int) -> dict:
    return {"source": str(source), "resolved": str(source.resolve()), "speaker_level": speaker_level,
            "sample_rate": sample_rate, "min_samples": min_samples}


def _manifest_stamp(source: Path) -> list[int] | None:
    if source.is_dir():
        return None
    st = source.stat()
    return [st.st_size, st.st_mtime_ns]


def _load_cache(path: Path, meta: dict) -> tuple[dict, list] | None:
    """(stored meta, rows) of a cache written with `meta`'s arguments; None if there is none or it was
    written for other arguments (to be rebuilt); a damaged file is a warning and None."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as fh:
            text = fh.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"ignoring the index cache {path}: {e.strerror or e}; rebuilding", CorpusWarning, stacklevel=3)
        return None
    lines = text.split("\n")
    try:
        head = lines[0].split(" ", 5)
        if " ".join(head[:4]) != _CACHE_MAGIC or len(head) < 6:
            raise _CacheDamaged("line 1 is not an index cache header")
        if head[4] != str(_CACHE_VERSION):
            return None
        stored = json.loads(head[5])
        if not isinstance(stored, dict):
            raise _CacheDamaged("line 1: bad header")
        if any(stored.get(k) != v for k, v in meta.items()):
            return None
        if lines[1] != "\t".join(_CACHE_COLUMNS):
            raise _CacheDamaged("line 2 is not the column header")
        if lines[-1] != "" or len(lines) - 3 != stored.get("files"):
            raise _CacheDamaged(f"{len(lines) - 3} rows where the header says {stored.get('files')}")
        rows = []
        for n, line in enumerate(lines[2:-1], 3):
            cells = line.split("\t")
            if len(cells) != len(_CACHE_COLUMNS):
                raise _CacheDamaged(f"line {n}: {len(cells)} cells, expected {len(_CACHE_COLUMNS)}")
            try:
                ints = [int(c) if c else None for c in cells[2:8]]
            except ValueError:
                raise _CacheDamaged(f"line {n}: not a number") from None
            rows.append((_unesc(cells[0]), _unesc(cells[1]), *ints, _unesc(cells[8]) or None))
    except (ValueError, KeyError, IndexError) as e:      # _CacheDamaged, JSON, a bad escape
        warnings.warn(f"ignoring the index cache {path}: it is damaged ({e!s:.200}); rebuilding", CorpusWarning,
                      stacklevel=3)
        return None
    return stored, rows


def _cache_text(meta: dict, rows: list[tuple]) -> str:
    head = f"{_CACHE_MAGIC} {_CACHE_VERSION} {json.dumps({**meta, 'files': len(rows)})}\n"
    body = ["\t".join(_CACHE_COLUMNS)]
    for path, speaker, size, mtime, frames, sr, ch, n, reason in rows:
        body.append("\t".join((_esc(path), _esc(speaker), *("" if v is None else str(v)
                                                             for v in (size, mtime, frames, sr, ch, n)),
                               _esc(reason or ""))))
    return head + "\n".join(body) + "\n"


def _save_cache(path: Path, text: str) -> None:
    from ..checkpoint import atomic_write
    try:
        atomic_write(path, text.encode("utf-8", errors="surrogateescape"))
    except OSError as e:
        warnings.warn(f"could not write the index cache {path}: {e.strerror or e}", CorpusWarning, stacklevel=3)


def index_corpus(source: str | Path, sample_rate: int, min_samples: int, *, speaker_level: int = 1,
                 cache: str | Path | None = None, trust_cache: bool = False,
                 threads: int | None = None) -> Corpus:
    """Index a directory or manifest; files shorter than `min_samples` (one window) are skipped.

    speaker_level: for a directory, the depth of the speaker folder (1: `speaker/...`, 2: a LibriSpeech
      root, `subset/speaker/chapter/utt.flac`).
    cache: a file that keeps the index (in a run directory: INDEX_CACHE_NAME). Headers are read only
      for files that are new or whose (size, mtime_ns) changed since it was written; files gone drop
      out. A cache written for another source, speaker level, sample rate or min_samples is rebuilt,
      and so is a damaged one (with a warning). Written atomically, and only when it changed.
    trust_cache: take a valid cache as the index without listing folders or reading headers (the
      other ranks of a run once rank 0 has built it: every rank gets the same index); a cache of a
      manifest that changed since is not taken. Never writes the cache.
    threads: threads reading headers (default `default_threads()`; 1: none).
    The warnings for rejected files are given with or without a cache.
    """
    source = Path(source)
    if not source.exists():
        raise CorpusError(f"corpus {source} does not exist")
    meta = loaded = rows = None
    if cache is not None:
        cache = Path(cache)
        meta = _cache_meta(source, speaker_level, sample_rate, min_samples)
        loaded = _load_cache(cache, meta)
    if trust_cache and loaded is not None and loaded[0].get("manifest") == _manifest_stamp(source):
        rows = loaded[1]
    if rows is None:
        entries = _entries(source, speaker_level)
        cached = {r[0]: _header_of(r) for r in loaded[1]} if loaded else None
        audio = [p for p, _ in entries if p.lower().endswith(AUDIO_EXTENSIONS)]
        headers = dict(zip(audio, _read_headers(audio, cached, threads or default_threads())))
        rows = []
        for path, speaker in entries:
            header = headers.get(path, (None,) * 6)
            n, reason = _judge(path, header, sample_rate, min_samples)
            rows.append((path, speaker, *header[:5], n or None, reason))
        if cache is not None and not trust_cache and (loaded is None or loaded[1] != rows):
            _save_cache(cache, _cache_text({**meta, "manifest": _manifest_stamp(source)}, rows))
    if speaker_level == 1 and source.is_dir():
        subsets = sorted({r[1] for r in rows} & LIBRISPEECH_SUBSETS)
        if subsets:
            warnings.warn(f"{source} looks like a LibriSpeech root: its folders {', '.join(subsets)} would be "
                          f"the speakers; use speaker level 2, or a manifest: python -m wavenet_ae.data.manifest "
                          f"{source} --out manifest.tsv --speaker-level 2", CorpusWarning, stacklevel=2)
    rejected: list[tuple[str, str]] = []
    utts = []
    for path, speaker, *_, n, reason in rows:      # judged when the row was made (a cache: same arguments)
        if reason:
            _reject(rejected, path, reason)
        else:
            utts.append(Utterance(path, speaker, n))
    if not utts:
        raise CorpusError(f"no usable audio in {source}" +
                          (f" ({len(rejected)} files skipped, see warnings)" if rejected else ""))
    return Corpus(utts, sorted({u.speaker for u in utts}), rejected)


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Read, mix to mono, resample to `sample_rate`, and check the content. Raises BadAudioError."""
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise BadAudioError(path, f"unreadable: {e}") from e
    if wav.size == 0:
        raise BadAudioError(path, "zero-length")
    if not np.isfinite(wav).all():
        raise BadAudioError(path, "NaN/inf samples")
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        import librosa
        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
    return wav


def load_or_skip(path: str, sample_rate: int) -> np.ndarray | None:
    """`load_audio`, or None after the skip warning when the content is bad."""
    try:
        return load_audio(path, sample_rate)
    except BadAudioError as e:
        warn_skip(e.path, e.reason)
        return None


def split_corpus(corpus: Corpus, source: str | Path, valid_fraction: float) -> dict[str, Corpus]:
    """{'train', 'valid', 'test'} corpora. A `split.tsv` (path, speaker, split) beside the corpus
    decides (the demo corpus has one); otherwise a hash of each path picks `valid` files."""
    source = Path(source)
    split_file = (source if source.is_dir() else source.parent) / "split.tsv"
    if split_file.is_file():
        which = {}
        for line in split_file.read_text().splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) >= 3:
                which[str((split_file.parent / cols[0]).resolve())] = cols[2]
        split_of = [which.get(str(Path(u.path).resolve())) for u in corpus.utterances]   # one resolve a file
        parts = {name: Corpus([u for u, w in zip(corpus.utterances, split_of) if w == name], corpus.speakers)
                 for name in SPLITS}
        dropped = [(u.path, w) for u, w in zip(corpus.utterances, split_of) if w not in SPLITS]
        if dropped and parts["train"].utterances:
            unlisted = [p for p, w in dropped if w is None]
            unknown = sorted({w for _, w in dropped if w is not None})
            warnings.warn(f"{split_file}: {len(dropped)} of {len(corpus.utterances)} files are not used: "
                          f"{len(unlisted)} not listed, {len(dropped) - len(unlisted)} under a split other "
                          f"than {'/'.join(SPLITS)}" + (f" ({', '.join(unknown[:5])})" if unknown else "")
                          + f"; e.g. {', '.join(p for p, _ in dropped[:3])}", CorpusWarning, stacklevel=2)
        if parts["train"].utterances:
            parts["train"].rejected = corpus.rejected
            return parts
    train, valid = corpus.split(valid_fraction, seed=0)
    return {"train": train, "valid": valid, "test": valid}
