"""Parsing of input shapes given on the command line."""
from __future__ import annotations

from rwdeploy.errors import OptionError


def parse_input_shape(text: str, *, option: str = "--input-shape") -> tuple[int, ...]:
    """'1,3,32,32' -> (1, 3, 32, 32); every entry a positive integer, at least two of them."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise OptionError(
            f"{option} {text!r} is not a shape",
            hint="give positive integers separated by commas, batch first, e.g. 1,3,32,32",
        )
    return dims
