"""Old import path of :mod:`condformer.generation.generate` and :mod:`condformer.generation.sampling`."""

from condformer.generation.decode import generate
from condformer.generation.sampling import SamplingConfig, check_request, left_pad, sample_next, sampling_probs

__all__ = ["SamplingConfig", "check_request", "generate", "left_pad", "sample_next", "sampling_probs"]
