"""Loop arithmetic the CPU schedules share (`tvm_schedule`, `tvm_transpose`), kept apart so that
neither imports the other."""
from __future__ import annotations


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of `n` that is at most `cap` (1 when `cap` < 1): a split factor that
    needs no predicate."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1
