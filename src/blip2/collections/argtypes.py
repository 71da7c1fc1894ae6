"""argparse types shared by the collection commands (`blip2 label`, `index`, `search` and their Ray options).
Standard library only: the CLI builds its parser from these modules and `blip2 --help` must stay instant."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _checked(cast: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # `not ok` also refuses NaN for the float checks
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a whole number of 1 or more")
non_negative_int = _checked(int, lambda v: v >= 0, "a whole number of 0 or more")
non_negative_float = _checked(float, lambda v: v >= 0, "a number of 0 or more")
