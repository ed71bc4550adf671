"""The corpora a run trains, validates and is evaluated on: one loader for `train` and `evaluate`."""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..rfield import plan
from . import DEMO_CORPUS
from .corpus import Corpus, index_corpus, split_corpus


def load_corpora(data: str | None, cfg: Config) -> dict[str, Corpus]:
    """{'train', 'valid', 'test'} corpora of `data` (default: the bundled demo corpus); files shorter
    than one training window (`rfield.plan`) are rejected."""
    source = Path(data) if data else DEMO_CORPUS
    corpus = index_corpus(source, cfg.model.sample_rate, plan(cfg.model, cfg.data.n_win).total_len)
    return split_corpus(corpus, source, cfg.data.valid_fraction)
