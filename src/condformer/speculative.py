"""Old import path of :mod:`condformer.generation.speculative`."""

from condformer.generation.speculative import accept_sampled, check_draft_depth, generate_speculative

__all__ = ["accept_sampled", "check_draft_depth", "generate_speculative"]
