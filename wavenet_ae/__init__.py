"""WaveNet autoencoder for speech. `wavenet_ae.load(run_dir_or_model_file)` -> `Model` (wavenet_ae.api).

The API is imported on first use (module __getattr__), so `import wavenet_ae` stays light: no torch.
"""
__version__ = "0.1.0"

__all__ = ["load", "Model", "Encoding", "__version__"]


def __getattr__(name: str):
    if name in ("load", "Model", "Encoding"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'wavenet_ae' has no attribute {name!r}")
