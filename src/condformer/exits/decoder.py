"""Old import path of :mod:`condformer.generation.exit_decoder`."""

from condformer.generation.exit_decoder import DecodeStats, ExitDecoder

__all__ = ["DecodeStats", "ExitDecoder"]
