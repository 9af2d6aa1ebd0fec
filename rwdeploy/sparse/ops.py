"""The `rwdeploy::sparse_linear` / `rwdeploy::sparse_conv2d` custom op family (torch.library).

Packed layers call these ops, so a packed model runs in eager PyTorch, traces with torch.fx,
exports with torch.export (the ops stay opaque nodes with their CSR/BSR arrays as inputs),
and is recognised by name by the ONNX and TVM exporters (`rwdeploy.runtime.onnx_sparse`,
`rwdeploy.runtime.tvm_sparse`). The eager kernels favour clarity: speed comes from the TVM
kernels; the eager CSR linear uses torch's CSR matmul.

Arguments shared by both ops: `values` (nnz_blocks, br, bc) float32, `indices` block-column
indices (any integer dtype), `indptr` int32, `bias` or None, `block` = [br, bc], and last,
optionally, `scale`: with int8 `values`, the float32 scale of every weight row (rows,), so
that the weight is values * scale[row] (`rwdeploy.sparse.quantize`).
"""
from __future__ import annotations

from typing import Optional

import warnings

import torch
import torch.nn.functional as F

from rwdeploy.sparse.formats import SparseMatrix, unpack

NAMESPACE = "rwdeploy"


def _dense(values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
           shape: tuple[int, int], block: list[int], scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    w = unpack(SparseMatrix(values.to(torch.float32), indices, indptr, shape, (block[0], block[1])))
    return w if scale is None else w * scale.reshape(-1, 1)


@torch.library.custom_op(f"{NAMESPACE}::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  indptr: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
                  in_features: int, block: list[int], scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W.T + bias with W (out_features, in_features) given in CSR/BSR."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).to(torch.float32)
    if scale is not None:
        y = x2 @ _dense(values, indices, indptr, (out_features, in_features), block, scale).t()
    elif block == [1, 1] and values.numel() > 0:
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w = torch.sparse_csr_tensor(indptr.to(torch.int64), indices.to(torch.int64),
                                    values.reshape(-1), (out_features, in_features),
                                    check_invariants=False)
        y = torch.sparse.mm(w, x2.t().contiguous()).t()
    else:
        y = x2 @ _dense(values, indices, indptr, (out_features, in_features), block).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features).contiguous()


@sparse_linear.register_fake
def _sparse_linear_fake(x, values, indices, indptr, bias, out_features, in_features, block, scale=None):
    return x.new_empty((*x.shape[:-1], out_features))


def conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@torch.library.custom_op(f"{NAMESPACE}::sparse_conv2d", mutates_args=())
def sparse_conv2d(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  indptr: torch.Tensor, bias: Optional[torch.Tensor], weight_shape: list[int],
                  block: list[int], stride: list[int], padding: list[int], dilation: list[int],
                  groups: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """conv2d(x, W) + bias with W (O, C/groups, kh, kw) stored as the (O, C/groups*kh*kw) matrix."""
    o, cg, kh, kw = weight_shape
    w = _dense(values, indices, indptr, (o, cg * kh * kw), block, scale).reshape(o, cg, kh, kw)
    return F.conv2d(x, w, bias, stride, padding, dilation, groups)


@sparse_conv2d.register_fake
def _sparse_conv2d_fake(x, values, indices, indptr, bias, weight_shape, block, stride, padding,
                        dilation, groups, scale=None):
    o, _, kh, kw = weight_shape
    oh = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], o, oh, ow))


OP_NAMES = ("sparse_linear", "sparse_conv2d")
