"""ABX error of frame-level features (latents vs MFCC frames) on the same triphone tokens.

Scored by zerospeech-libriabx2 (import name zrc_abx2), the maintained libri-light ABX, in the
ZeroSpeech 2017 condition: triphone minimal pairs (same previous and next phone, different centre
phone), DTW over frame-wise cosine distances, within and across speakers. Its group sampling bounds
the cost: at most ABX_MAX_SIZE_GROUP tokens per (context, phone, speaker) group and
ABX_MAX_X_ACROSS X speakers per A/B pair across speakers (the package's defaults).
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .probes import Frames

SILENCES = frozenset({"pau", "sil", "sp", "spn", "h#", "<sil>"})   # never a centre phone
ABX_MAX_SIZE_GROUP = 10
ABX_MAX_X_ACROSS = 5


@dataclass
class Token:
    """One centre phone with its context: a row of the item file."""
    file: str
    onset: float
    offset: float
    phone: str
    prev: str
    next: str
    speaker: str


def triphone_tokens(file: str, speaker: str, alignment) -> list[Token]:
    """Tokens that have a previous and a next phone; silences may be context but never a centre."""
    return [Token(file, a, b, ph, alignment[i - 1][2], alignment[i + 1][2], speaker)
            for i, (a, b, ph) in enumerate(alignment[1:-1], start=1) if ph not in SILENCES]


def abx_group_counts(tokens: list[Token]) -> dict[str, int]:
    """A-groups (context, speaker, phone) that zrc_abx2 can score: within speakers one needs two tokens
    (A and X) and another phone B of the same context and speaker; across speakers B as before and X
    of the same context and phone from another speaker."""
    from collections import Counter, defaultdict
    n = Counter((t.prev, t.next, t.speaker, t.phone) for t in tokens)
    phones, speakers = defaultdict(set), defaultdict(set)
    for c0, c1, s, ph in n:
        phones[c0, c1, s].add(ph)
        speakers[c0, c1, ph].add(s)
    within = sum(1 for (c0, c1, s, ph), k in n.items() if k >= 2 and len(phones[c0, c1, s]) >= 2)
    across = sum(1 for (c0, c1, s, ph) in n if len(phones[c0, c1, s]) >= 2 and len(speakers[c0, c1, ph]) >= 2)
    return {"within": within, "across": across}


def write_item_file(path: Path, tokens: list[Token], first_centre: float, step: float) -> None:
    """The libri-light item file (header, then `file onset offset phone prev next speaker`) with times
    mapped to zrc_abx2's frame convention. It takes frames i with (i + 0.5) * step in
    [onset, offset - step] (ABXFeatureLoader._start_end_indices); ours are centred at
    first_centre + i * step (latents: (i + 0.5) * hop / sr; MFCC: half the analysis span later than
    the frame start). Shifting the onset by -shift and the offset by -shift + step selects exactly
    the frames whose own centre lies in [onset, offset] (1 us of slack against rounding)."""
    shift = first_centre - 0.5 * step
    lines = ["#file onset offset #phone prev-phone next-phone speaker"]
    lines += [f"{t.file} {t.onset - shift - 1e-6:.6f} {t.offset - shift + step + 1e-6:.6f} "
              f"{t.phone} {t.prev} {t.next} {t.speaker}" for t in tokens]
    path.write_text("\n".join(lines) + "\n")


def abx_errors(alignments: list, features: dict[str, tuple[float, list[Frames]]],
               seed: int = 0) -> tuple[dict | None, dict]:
    """ABX error (%) within and across speakers of each feature set, on the same triphone tokens.

    alignments[i]: phone alignment [(start, end, phone), ...] of utterance i, or None;
    features[name] = (frame step in s, [Frames of utterance i]), frames uniformly spaced from the same
    first centre in every utterance (true of the latents and of the MFCC frames). Tokens
    that contain no frame centre of some feature set are dropped for all, so that every feature set
    is scored on the same items. Returns ({name: {"within": %, "across": %}}, setup), the scores
    None when zrc_abx2 is missing or there is no minimal pair."""
    t_start = time.perf_counter()
    try:
        from zrc_abx2 import EvalABX, EvalArgs
    except ImportError as e:       # optional: the `abx` extra in pyproject.toml, scripts/test.sh
        warnings.warn(f"ABX not computed: zrc_abx2 (pip package zerospeech-libriabx2) is not importable ({e})")
        return None, {}
    tokens, files = [], {}
    for i, ali in enumerate(alignments):
        frames = [fr[i] for _, fr in features.values()]
        for tok in triphone_tokens(f"utt{i:05d}", frames[0].speaker, ali or []):
            if all(np.searchsorted(f.t, tok.offset, "right") > np.searchsorted(f.t, tok.onset, "left")
                   for f in frames):
                tokens.append(tok)
                files[tok.file] = i
    groups = abx_group_counts(tokens)
    setup = {"files": len(files), "items": len(tokens), "a_groups": groups,
             "max_size_group": ABX_MAX_SIZE_GROUP, "max_x_across": ABX_MAX_X_ACROSS}
    modes = [m for m in ("within", "across") if groups[m] > 0]
    if not modes:
        return None, setup
    scores: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (step, frames) in features.items():
            d = Path(tmp) / name
            d.mkdir()
            for f, i in files.items():
                np.save(d / f"{f}.npy", np.asarray(frames[i].x, np.float32))
            item = Path(tmp) / f"abx-{name}.item"      # "<dataset>-<subset>" keeps zrc_abx2 quiet
            write_item_file(item, tokens, float(frames[next(iter(files.values()))].t[0]), step)
            args = EvalArgs(path_data=str(d), path_item_file=str(item), file_extension=".npy",
                            feature_size=step, speaker_mode="all" if len(modes) == 2 else modes[0],
                            context_mode="within", distance_mode="cosine", max_size_group=ABX_MAX_SIZE_GROUP,
                            max_x_across=ABX_MAX_X_ACROSS, seed=seed)
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")         # its deprecated torch.sparse constructors
                result = EvalABX().eval_abx(args)
            scores[name] = {"within": None, "across": None}
            for r in result:
                scores[name][r["abx-s-condition"]] = 100.0 * float(r["score"])
    setup["seconds"] = time.perf_counter() - t_start
    return scores, setup
