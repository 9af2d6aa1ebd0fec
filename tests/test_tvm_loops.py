"""The loop arithmetic the CPU schedules share (`runtime.tvm_loops`), against values by hand."""
import pytest

from rwdeploy.runtime.tvm_loops import largest_divisor, vector_pieces


@pytest.mark.parametrize("n,cap,want", [(112, 14, 14), (56, 7, 7), (7, 4, 1), (24, 64, 24), (130, 64, 26),
                                        (13, 12, 1), (12, 0, 1)])
def test_largest_divisor(n, cap, want):
    assert largest_divisor(n, cap) == want


@pytest.mark.parametrize("extent,lanes,want", [(28, 16, [16, 8, 4]), (10, 16, [8, 2]), (48, 16, [48]),
                                               (7, 16, [4, 2, 1]), (19, 8, [16, 2, 1]), (16, 16, [16]),
                                               (0, 16, [])])
def test_vector_pieces(extent, lanes, want):
    assert vector_pieces(extent, lanes) == want
