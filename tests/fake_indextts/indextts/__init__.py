"""A stand-in for `indextts` (indextts2-inference), for machines without a GPU or the weights.

Same import path, constructor and `infer` signature as the real package; returns arrays of the
real shape and rate. See `infer_v2.py`.
"""

from indextts.infer_v2 import IndexTTS2

__all__ = ["IndexTTS2"]
