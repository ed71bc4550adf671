"""The corpora a run trains, validates and is evaluated on: one loader for `train` and `evaluate`."""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..rfield import plan
from . import DEMO_CORPUS
from .corpus import Corpus, index_corpus, split_corpus


def load_corpora(data: str | None, cfg: Config, *, cache: str | Path | None = None, trust_cache: bool = False,
                 speaker_level: int = 1) -> dict[str, Corpus]:
    """{'train', 'valid', 'test'} corpora of `data` (default: the bundled demo corpus); files shorter
    than one training window (`rfield.plan`) are rejected. `cache`, `trust_cache`, `speaker_level`: as
    in `corpus.index_corpus` (a run keeps its cache at RUN_DIR / corpus.INDEX_CACHE_NAME)."""
    source = Path(data) if data else DEMO_CORPUS
    corpus = index_corpus(source, cfg.model.sample_rate, plan(cfg.model, cfg.data.n_win).total_len,
                          speaker_level=speaker_level, cache=cache, trust_cache=trust_cache)
    return split_corpus(corpus, source, cfg.data.valid_fraction)
