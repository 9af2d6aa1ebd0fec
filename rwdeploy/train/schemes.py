"""Pruning schemes: names, their arguments, and how a scheme string is written.

A scheme string lists one or more schemes joined by `+`, each optionally with its own rate:
`filter:0.5+irregular:0.9`, `block4x1`, `pattern+irregular`. A scheme without a rate uses the
run's `--rate`. Within a layer, schemes are applied coarse to fine (the order of
`SCHEME_ORDER`), each counting weights already pruned by the previous ones.

The rate of a scheme is the fraction of its groups that end up zero: of the weights
(irregular), of the filters (filter), of the 3x3 kernels beyond the pattern (pattern), ...
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from rwdeploy.errors import OptionError

# Coarse before fine: structured schemes decide first, irregular pruning fills up the rate.
SCHEME_ORDER = ("filter", "channel", "kernel", "column", "block", "pattern", "irregular")
COUPLED_SCHEMES = ("filter", "channel")  # groups come from the channel-dependency analysis
_BLOCK = re.compile(r"^block(\d+)x(\d+)$")


@dataclass(frozen=True)
class SchemeSpec:
    name: str  # one of SCHEME_ORDER
    rate: float | None = None  # None: the run's default rate
    args: tuple[int, ...] = field(default=())  # block: (rows, cols); pattern: (library size,)

    @property
    def label(self) -> str:
        if self.name == "block":
            return f"block{self.args[0]}x{self.args[1]}"
        if self.name == "pattern" and self.args and self.args[0] != DEFAULT_PATTERNS:
            return f"pattern{self.args[0]}"
        return self.name

    def with_rate(self, rate: float) -> "SchemeSpec":
        return SchemeSpec(self.name, rate if self.rate is None else self.rate, self.args)


def check_rate(rate: float, where: str) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise OptionError(f"{where}: rate {rate} is outside [0, 1)", hint="a rate is the fraction of groups pruned, e.g. 0.75")
    return rate


def check_round_to(value: object, where: str = "--round-to") -> int:
    """A kept-group multiple: a positive int (1 = no rounding)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{where} {value!r}: must be a positive integer (1 = off)",
                          hint="the kept filters/channels of each channel group become a multiple of it, e.g. 4 "
                               "(recipe key round_to)")
    return value


def parse_scheme(text: str, where: str = "--scheme") -> list[SchemeSpec]:
    """Parse `filter:0.5+irregular` into scheme specs, coarse to fine."""
    specs: dict[str, SchemeSpec] = {}
    for part in str(text).replace(" ", "").split("+"):
        if not part:
            raise OptionError(f"{where} {text!r}: empty scheme", hint="write e.g. filter:0.5+irregular")
        name, _, rate_text = part.partition(":")
        rate = None
        if rate_text:
            try:
                rate = check_rate(float(rate_text), f"{where} {part}")
            except ValueError:
                raise OptionError(f"{where} {part}: rate {rate_text!r} is not a number") from None
        args: tuple[int, ...] = ()
        m = _BLOCK.match(name)
        if name == "block":
            args = (1, 4)  # matches the packer's BSR 1x4
        elif m:
            name, args = "block", (int(m.group(1)), int(m.group(2)))
            if min(args) < 1:
                raise OptionError(f"{where} {part}: block sizes must be positive")
        elif name.startswith("pattern"):
            n = name[len("pattern"):] or str(DEFAULT_PATTERNS)
            if not n.isdigit() or not 1 <= int(n) <= len(PATTERNS):
                raise OptionError(f"{where} {part}: pattern library size must be 1..{len(PATTERNS)}")
            name, args = "pattern", (int(n),)
        if name not in SCHEME_ORDER:
            raise OptionError(f"{where}: unknown scheme {name!r}",
                              hint=f"use {', '.join(SCHEME_ORDER)} (block as blockRxC, e.g. block1x4)")
        if name in specs:
            raise OptionError(f"{where} {text!r}: scheme {name} given twice")
        specs[name] = SchemeSpec(name, rate, args)
    return [specs[n] for n in SCHEME_ORDER if n in specs]


# 3x3 patterns of 4 kept entries, row-major positions 0..8 (4 is the centre). Each keeps the
# centre and three neighbours: four "T" shapes (centre + three of its 4-neighbours), then four
# "corner" shapes (centre, two 4-neighbours and the diagonal between them), as in PatDNN.
PATTERNS: tuple[tuple[int, ...], ...] = (
    (1, 3, 4, 5), (1, 4, 5, 7), (3, 4, 5, 7), (1, 3, 4, 7),
    (0, 1, 3, 4), (1, 2, 4, 5), (4, 5, 7, 8), (3, 4, 6, 7),
)
DEFAULT_PATTERNS = 8


def pattern_library(n: int = DEFAULT_PATTERNS) -> torch.Tensor:
    """The first `n` patterns as a bool tensor [n, 9] (True = kept)."""
    lib = torch.zeros(n, 9, dtype=torch.bool)
    for i, pat in enumerate(PATTERNS[:n]):
        lib[i, list(pat)] = True
    return lib
