"""The depth-adaptive Transformer: exit heads, halting, depth policies of the layer loop, cached exit decoding."""
