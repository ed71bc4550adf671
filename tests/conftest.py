import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch


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


@pytest.fixture
def one_thread():
    """Step-by-step loops on tiny tensors gain nothing from intra-op threads and lose a lot when the
    machine is shared (spinning OpenMP workers). Modules take it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_run_dir(d, *, bottleneck="vqvae", speakers=("alice", "bob"), step=7, seed=0, feature_stats=False):
    """A hand-made run dir at `d` (config.json, speakers.json, one training-loop checkpoint) of an untrained
    tiny model; a VQ-VAE quantises from the start (no warm-up), as a trained run does. feature_stats:
    random non-trivial encoder feature statistics instead of the identity."""
    from wavenet_ae import checkpoint
    from wavenet_ae.config import preset
    from wavenet_ae.model import WaveNetAE
    cfg = preset("tiny").with_overrides([f"model.bottleneck={bottleneck}"])
    cfg.model.vq_warmup_steps = 0
    d.mkdir(parents=True)
    (d / "config.json").write_text(cfg.to_json())
    (d / "speakers.json").write_text(json.dumps(list(speakers)))
    torch.manual_seed(seed)
    model = WaveNetAE(cfg.model)
    if feature_stats:
        model.encoder.set_feature_stats(torch.randn(cfg.model.n_in), torch.rand(cfg.model.n_in) + 0.5)
    checkpoint.save(d, step, {"model": model.state_dict(), "step": step}, keep=0)
    return d


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
