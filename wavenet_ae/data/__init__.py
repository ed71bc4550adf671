"""Audio data: the bundled demo corpus and training windows cut as `rfield.plan` says."""
from pathlib import Path

DEMO_CORPUS = Path(__file__).resolve().parent / "demo_corpus"
