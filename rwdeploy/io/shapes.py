"""Parsing of input shapes given on the command line."""
from __future__ import annotations

import re

from rwdeploy.errors import OptionError


def parse_input_shape(text: str, *, option: str = "--input-shape") -> tuple[int, ...]:
    """'1,3,32,32' -> (1, 3, 32, 32); every entry a positive integer, at least two of them."""
    parts = [p.strip() for p in re.split(r"[,x]", str(text))]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:  # also catches an empty entry, as in "1,3,,32"
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise OptionError(
            f"{option} {text!r} is not a shape",
            hint="give positive integers separated by commas, batch first, e.g. 1,3,32,32",
        )
    return dims
