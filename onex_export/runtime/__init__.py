"""Runners (one interface per backend) and the sampler that drives them."""
from .sampler import Conditioning, Denoiser, TorchDenoiser, sample

__all__ = ["Conditioning", "Denoiser", "TorchDenoiser", "sample"]
