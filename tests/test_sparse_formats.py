"""CSR/BSR pack/unpack round trips on hand-made matrices."""
import numpy as np
import pytest
import torch

from rwdeploy.errors import OptionError
from rwdeploy.sparse import pack, unpack
from rwdeploy.sparse.formats import index_dtype

BLOCKS = [(1, 1), (1, 4), (4, 1), (2, 2)]


def hand_made():
    single = torch.zeros(8, 8)
    single[5, 3] = 2.5
    empty_rows = torch.zeros(8, 8)
    empty_rows[0, :4] = torch.arange(1.0, 5.0)
    empty_rows[7, 7] = -1.0                    # rows 1..6 empty
    return {"empty_matrix": torch.zeros(8, 8), "single": single, "empty_rows": empty_rows,
            "dense": torch.arange(1.0, 65.0).reshape(8, 8)}


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("case", sorted(hand_made()))
def test_round_trip(case, block):
    w = hand_made()[case]
    m = pack(w, block)
    assert torch.equal(unpack(m), w)
    assert m.indptr.dtype == torch.int32 and m.values.dtype == torch.float32
    assert m.indptr.shape == (8 // block[0] + 1,)
    assert int(m.indptr[-1]) == m.nnz_blocks


def test_csr_arrays_by_hand():
    w = hand_made()["empty_rows"]
    m = pack(w)
    assert m.values.reshape(-1).tolist() == [1.0, 2.0, 3.0, 4.0, -1.0]
    assert m.indices.tolist() == [0, 1, 2, 3, 7]
    assert m.indptr.tolist() == [0, 4, 4, 4, 4, 4, 4, 4, 5]
    assert m.nbytes() == 5 * 4 + 5 * 1 + 9 * 4          # uint8 indices for 8 columns


def test_bsr_keeps_whole_blocks():
    w = hand_made()["single"]                            # non-zero at (5, 3)
    m = pack(w, (4, 1))
    assert m.nnz_blocks == 1 and m.indices.tolist() == [3]
    assert m.values.reshape(-1).tolist() == [0.0, 2.5, 0.0, 0.0]   # rows 4..7 of column 3
    assert m.indptr.tolist() == [0, 0, 1]
    m = pack(w, (1, 4))
    assert m.indices.tolist() == [0] and m.values.reshape(-1).tolist() == [0.0, 0.0, 0.0, 2.5]


def test_zero_sized_matrix():
    m = pack(torch.zeros(0, 5))
    assert m.nnz == 0 and unpack(m).shape == (0, 5)


def test_random_round_trip_and_narrow_indices():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 300)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    m = pack(w)
    assert m.indices.dtype == torch.int16               # 300 columns do not fit uint8
    assert torch.equal(unpack(m), torch.from_numpy(w))


def test_index_dtype_boundaries():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(1 << 15) == torch.int16
    assert index_dtype((1 << 15) + 1) == torch.int32


def test_block_must_tile():
    with pytest.raises(OptionError, match="does not tile"):
        pack(torch.ones(6, 6), (4, 1))
