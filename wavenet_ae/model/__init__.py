from .autoencoder import WaveNetAE

__all__ = ["WaveNetAE"]
