"""The compute dial: inference settings with a statistical quality guarantee.

A setting (an exit threshold, a capacity, a number of experts, ...) is cheaper the less it computes and worse the
more it departs from the full model. The dial picks the cheapest setting whose risk of departing is certified,
on calibration data, to stay within a tolerance with high probability (Learn-then-Test, :mod:`condformer.dial.ltt`).
"""
