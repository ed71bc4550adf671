"""Frame-level views of held-out audio and the linear probes read from them: latents and MFCC frames
with their times and phone / speaker labels, frame accuracy of a logistic-regression probe, and the
MFCC speaker classifier that judges voice conversion."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..encode import encode_signal
from ..features import mfcc_features


@dataclass
class Frames:
    """Frame-level features with their times (s) and labels, for one utterance."""
    x: np.ndarray            # (n, d)
    t: np.ndarray            # (n,) centre times in seconds
    speaker: str
    phones: list | None      # label per frame (None where outside the alignment)


def read_alignment(audio_path: str) -> list[tuple[float, float, str]] | None:
    p = Path(audio_path)
    tsv = p.with_name(p.stem + ".phones.tsv")
    if not tsv.is_file():
        return None
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return [(float(a), float(b), c) for a, b, c in rows]


def label_at(alignment, times: np.ndarray) -> list:
    starts = np.array([a for a, _, _ in alignment])
    idx = np.searchsorted(starts, times, side="right") - 1
    return [alignment[i][2] if 0 <= i and times[k] < alignment[i][1] else None
            for k, i in enumerate(idx)]


def utterance_frames(model, wav: np.ndarray, path: str,
                     speaker: str) -> tuple[Frames, Frames, np.ndarray | None]:
    """(latent frames, MFCC frames, VQ codes) of one file's audio `wav` (its alignment is read
    beside `path`)."""
    m = model.cfg
    z, codes = encode_signal(model, wav)
    tz = (np.arange(len(z)) + 0.5) * m.hop / m.sample_rate
    mf = mfcc_features(wav, m).T
    span = m.mfcc_win + (m.delta_width - 1) * m.mfcc_hop
    tm = (np.arange(len(mf)) * m.mfcc_hop + span / 2) / m.sample_rate
    ali = read_alignment(path)
    return (Frames(z, tz, speaker, label_at(ali, tz) if ali else None),
            Frames(mf, tm, speaker, label_at(ali, tm) if ali else None), codes)


def linear_probe(train: list[Frames], test: list[Frames], target: str) -> float | None:
    """Frame accuracy of a multinomial logistic regression trained on `train`, tested on `test`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def stack(frames):
        xs, ys = [], []
        for f in frames:
            labels = f.phones if target == "phone" else [f.speaker] * len(f.x)
            if labels is None:
                continue
            keep = [i for i, y in enumerate(labels) if y is not None]
            xs.append(f.x[keep])
            ys += [labels[i] for i in keep]
        return (np.concatenate(xs), np.array(ys)) if xs else (None, None)

    xtr, ytr = stack(train)
    xte, yte = stack(test)
    if xtr is None or xte is None or len(set(ytr)) < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(xtr, ytr)
    return float((clf.predict(xte) == yte).mean())


def speaker_classifier(frames: list[Frames]):
    """MFCC frame-level speaker classifier (the probe used to judge voice conversion)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x = np.concatenate([f.x for f in frames])
    y = np.concatenate([[f.speaker] * len(f.x) for f in frames])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x, y)
    return clf
