"""Unstructured sparsity: CSR/BSR formats, the rwdeploy::sparse_* custom ops, packed layers."""
from rwdeploy.sparse.formats import BLOCK_SHAPES, CSR, SparseMatrix, format_name, pack, sparsity, unpack
from rwdeploy.sparse.modules import PACKED_TYPES, CsrConv2d, CsrLinear, unpack_module

__all__ = ["BLOCK_SHAPES", "CSR", "SparseMatrix", "format_name", "pack", "sparsity", "unpack",
           "PACKED_TYPES", "CsrConv2d", "CsrLinear", "unpack_module"]
