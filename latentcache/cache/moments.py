"""Mergeable per-channel statistics of the raw latents (the implementation lives in `stats`)."""

from ..stats import Moments, merge_all, summary

__all__ = ["Moments", "merge_all", "summary"]
