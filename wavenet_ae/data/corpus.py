"""Corpus index: which audio files, which speaker, how long, and which were rejected and why.

A corpus is a directory (speaker = first-level folder name) or a manifest TSV `path<TAB>speaker`
(paths relative to the manifest; a `path\tspeaker` header line is allowed). Headers are checked up
front (missing, unreadable, unknown extension, no channels, empty, too short); the content
(NaN/inf, decoding errors) is checked when a file is loaded. Every rejected file gets one warning
line naming it and the reason, and the index keeps a summary.
"""
from __future__ import annotations

import csv
import hashlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SPLITS = ("train", "valid", "test")      # the split names `split.tsv` may use


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


def _entries(source: Path) -> list[tuple[str, str]]:
    if source.is_dir():
        return [(str(p), p.relative_to(source).parts[0])
                for p in sorted(source.rglob("*"))
                if p.is_file() and len(p.relative_to(source).parts) >= 2
                and not p.name.endswith((".tsv", ".txt", ".md", ".json"))]
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


def index_corpus(source: str | Path, sample_rate: int, min_samples: int) -> Corpus:
    """Index a directory or manifest; files shorter than `min_samples` (one window) are skipped."""
    source = Path(source)
    rejected: list[tuple[str, str]] = []
    utts = []
    for path, speaker in _entries(source):
        if not path.lower().endswith(AUDIO_EXTENSIONS):
            _reject(rejected, path, f"unknown extension (expected {', '.join(AUDIO_EXTENSIONS)})")
            continue
        if not Path(path).is_file():
            _reject(rejected, path, "missing file")
            continue
        try:
            info = sf.info(path)
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for corrupt headers
            _reject(rejected, path, f"unreadable: {e}")
            continue
        if info.channels < 1:
            _reject(rejected, path, f"bad channel count: {info.channels}")
            continue
        if info.frames <= 0:
            _reject(rejected, path, "zero-length")
            continue
        n = int(round(info.frames * sample_rate / info.samplerate))
        if n < min_samples:
            _reject(rejected, path, f"too short: {n} samples at {sample_rate} Hz, one window needs {min_samples}")
            continue
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
