"""Decoding: KV-cached sampling (:mod:`.decode`), self-speculative decoding (:mod:`.speculative`) and early-exit
decoding (:mod:`.exit_decoder`), on top of the shared sampling pieces (:mod:`.sampling`)."""

from condformer.generation.decode import generate
from condformer.generation.exit_decoder import DecodeStats, ExitDecoder
from condformer.generation.sampling import SamplingConfig, check_request, left_pad, sample_next, sampling_probs
from condformer.generation.speculative import accept_sampled, generate_speculative

__all__ = ["DecodeStats", "ExitDecoder", "SamplingConfig", "accept_sampled", "check_request", "generate",
           "generate_speculative", "left_pad", "sample_next", "sampling_probs"]
