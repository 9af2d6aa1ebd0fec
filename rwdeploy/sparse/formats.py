"""Compressed sparse row storage for a 2-D weight matrix, element-wise (CSR) or in blocks (BSR).

One container covers both: a matrix of shape (rows, cols) is cut into blocks of
(block_rows x block_cols); every block that holds a non-zero is stored whole.
CSR is the 1x1 case. Arrays:

- values:  float32, shape (nnz_blocks, block_rows, block_cols)
- indices: block-column index of every stored block, in the narrowest integer type that
           holds cols // block_cols - 1 (uint8, int16 or int32: fewer bytes per non-zero)
- indptr:  int32, shape (rows // block_rows + 1); block row r owns indices[indptr[r]:indptr[r+1]]

A convolution weight (O, C/groups, kh, kw) is stored as the matrix (O, C/groups*kh*kw):
row = output channel, column = (input channel in group, ky, kx) in that order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rwdeploy.errors import OptionError

CSR = (1, 1)
# Block shapes the packer offers to the selector; the selector keeps whichever measures fastest.
BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((1, 4), (4, 1), (1, 8), (8, 1))


def format_name(block: tuple[int, int]) -> str:
    return "csr" if tuple(block) == CSR else f"bsr{block[0]}x{block[1]}"


def index_dtype(n_block_cols: int) -> torch.dtype:
    """The narrowest integer dtype that can hold every block-column index (0 .. n-1)."""
    if n_block_cols <= 1 << 8:
        return torch.uint8
    if n_block_cols <= 1 << 15:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class SparseMatrix:
    values: torch.Tensor
    indices: torch.Tensor
    indptr: torch.Tensor
    shape: tuple[int, int]
    block: tuple[int, int] = CSR

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def nnz(self) -> int:
        """Stored values (explicit zeros inside blocks included)."""
        return int(self.values.numel())

    @property
    def format(self) -> str:
        return format_name(self.block)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.indptr))

    def to_dense(self) -> torch.Tensor:
        return unpack(self)


def fits_block(shape: tuple[int, int], block: tuple[int, int]) -> bool:
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def pack(weight: torch.Tensor | np.ndarray, block: tuple[int, int] = CSR) -> SparseMatrix:
    """Pack a 2-D matrix; blocks that are entirely zero are dropped."""
    w = torch.as_tensor(weight).detach().to(torch.float32).cpu()
    if w.dim() != 2:
        raise OptionError(f"sparse packing needs a 2-D matrix, got shape {tuple(w.shape)}")
    rows, cols = int(w.shape[0]), int(w.shape[1])
    br, bc = int(block[0]), int(block[1])
    if br < 1 or bc < 1 or not fits_block((rows, cols), (br, bc)):
        raise OptionError(f"block {br}x{bc} does not tile a {rows}x{cols} matrix",
                          hint="choose a block shape that divides both dimensions")
    tiles = w.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3)  # (RB, CB, br, bc)
    keep = tiles.ne(0).flatten(2).any(dim=2)                               # (RB, CB)
    block_rows, block_cols = keep.nonzero(as_tuple=True)                   # row-major order
    counts = keep.sum(dim=1)
    indptr = torch.zeros(rows // br + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return SparseMatrix(
        values=tiles[block_rows, block_cols].contiguous(),
        indices=block_cols.to(index_dtype(cols // bc)),
        indptr=indptr.to(torch.int32),
        shape=(rows, cols),
        block=(br, bc),
    )


def unpack(m: SparseMatrix) -> torch.Tensor:
    """The dense (rows, cols) float32 matrix."""
    rows, cols = m.shape
    br, bc = m.block
    n_block_rows = rows // br
    counts = (m.indptr[1:] - m.indptr[:-1]).to(torch.int64)
    block_row = torch.repeat_interleave(torch.arange(n_block_rows), counts)
    tiles = torch.zeros(n_block_rows, cols // bc, br, bc, dtype=torch.float32)
    tiles[block_row, m.indices.to(torch.int64)] = m.values
    return tiles.permute(0, 2, 1, 3).reshape(rows, cols)


def sparsity(weight: torch.Tensor) -> float:
    """Fraction of exact zeros."""
    n = weight.numel()
    return 0.0 if n == 0 else float((weight == 0).sum()) / n
