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
