"""Linear CKA between layers of two models cached on the same images."""

from interptool.analyzers.cka._analyzer import CKAResult, cka, linear_cka, unbiased_hsic

__all__ = ["CKAResult", "cka", "linear_cka", "unbiased_hsic"]
