"""Predicates on config values: a typed node can still hold a bool where an int belongs (YAML's
``true`` is an int to Python) or a NaN; the ``problems()`` methods use these."""

from __future__ import annotations

import math


def is_int(v) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
