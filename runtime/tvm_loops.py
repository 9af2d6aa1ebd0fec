"""Loop arithmetic the CPU schedules share (`tvm_schedule`, `tvm_transpose`, `tvm_pool`,
`tvm_row_winograd`), kept apart so that none imports another."""
from __future__ import annotations


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of `n` that is at most `cap` (1 when `cap` < 1): a split factor that
    needs no predicate."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def vector_pieces(extent: int, lanes: int) -> list[int]:
    """`extent` as whole vectors of `lanes` (one part) and then power-of-two parts of the rest:
    28 at 16 lanes is [16, 8, 4], 10 is [8, 2]. Each part vectorises without a predicate, where
    one odd-width LLVM vector would be split into masked pieces."""
    parts = [extent // lanes * lanes] if extent >= lanes else []
    rest = extent - sum(parts)
    while rest:
        parts.append(1 << (rest.bit_length() - 1))
        rest -= parts[-1]
    return parts
