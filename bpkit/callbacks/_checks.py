"""Argument checks the callbacks share (they live in :mod:`bpkit.errors`, for the engines too)."""

from bpkit.errors import check_bool, check_globs

__all__ = ["check_bool", "check_globs"]
