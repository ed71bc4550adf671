import re

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture
def synth_corpus(tmp_path):
    """A directory corpus of short synthetic utterances: speaker folders, varied lengths/rates."""
    def make(n_speakers=3, per_speaker=4, seconds=(0.6, 1.4), sample_rate=16000, seed=0):
        rng = np.random.default_rng(seed)
        root = tmp_path / "corpus"
        for s in range(n_speakers):
            (root / f"spk{s}").mkdir(parents=True, exist_ok=True)
            for u in range(per_speaker):
                n = int(rng.uniform(*seconds) * sample_rate)
                t = np.arange(n) / sample_rate
                wav = 0.3 * np.sin(2 * np.pi * (120 + 40 * s) * t) + 0.05 * rng.standard_normal(n)
                sf.write(root / f"spk{s}" / f"u{u}.wav", wav.astype(np.float32), sample_rate)
        return root
    return make


# --- the `cuda` marker: `pytest -m cuda` runs exactly the tests that need a GPU -----------------------
# (scripts/gpu_check.sh runs them on a lent GPU.) A test is a CUDA test when its name says so (test ids
# like `test_cuda_*` or `...[...-cuda]`) or when it carries a skipif whose reason names a GPU or CUDA.

def _is_cuda_test(item) -> bool:
    if "cuda" in item.name.lower():
        return True
    return any(re.search(r"\b(gpu|cuda)\b", str(mark.kwargs.get("reason", "")), re.I)
               for mark in item.iter_markers("skipif"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (set by tests/conftest.py from the test's name or "
                                       "its skip reason); `pytest -m cuda` runs exactly these")


@pytest.hookimpl(tryfirst=True)          # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_cuda_test(item):
            item.add_marker(pytest.mark.cuda)
