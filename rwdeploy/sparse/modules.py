"""Packed layers: nn.Linear / nn.Conv2d whose weight is held as CSR/BSR arrays (buffers).

The arrays are buffers, not parameters: packing is a deployment step, not a training one.
With int8 `values` a layer also holds `scale` (float32, one per weight row): the weight is
values * scale[row] (`rwdeploy.sparse.quantize`).
"""
from __future__ import annotations

import torch
from torch import nn

from rwdeploy.sparse import ops  # noqa: F401  (registers torch.ops.rwdeploy.*)
from rwdeploy.sparse.formats import CSR, SparseMatrix, pack


class _Packed(nn.Module):
    block: tuple[int, int]

    def _store(self, m: SparseMatrix, bias: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
        self.block = tuple(m.block)
        self.register_buffer("values", m.values.clone())
        self.register_buffer("indices", m.indices.clone())
        self.register_buffer("indptr", m.indptr.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("scale", None if scale is None else scale.detach().float().clone())

    def matrix(self) -> SparseMatrix:
        """The weight as float32 CSR/BSR (int8 values times their row scales)."""
        values = self.values
        if self.scale is not None:
            rows = torch.repeat_interleave(torch.arange(self.matrix_shape[0] // self.block[0]),
                                           (self.indptr[1:] - self.indptr[:-1]).to(torch.int64))
            values = values.float() * self.scale.reshape(-1, self.block[0], 1)[rows]
        return SparseMatrix(values, self.indices, self.indptr, self.matrix_shape, self.block)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def format(self) -> str:
        return self.matrix().format

    def _int8(self) -> str:
        return "" if self.scale is None else f", {self.values.dtype} values"

    def packed_bytes(self) -> int:
        arrays = (self.values, self.indices, self.indptr) + (() if self.scale is None else (self.scale,))
        return sum(t.numel() * t.element_size() for t in arrays)


class CsrLinear(_Packed):
    """y = x @ W.T + b with W in CSR (block (1,1)) or BSR."""

    def __init__(self, matrix: SparseMatrix, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = matrix.shape
        self._store(matrix, bias, scale)

    @classmethod
    def from_dense(cls, layer: nn.Linear, block: tuple[int, int] = CSR) -> "CsrLinear":
        return cls(pack(layer.weight, block), layer.bias)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def to_dense(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.matrix().to_dense())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rwdeploy.sparse_linear(
            x, self.values, self.indices, self.indptr, self.bias,
            self.out_features, self.in_features, list(self.block), self.scale)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.format}, {self.values.numel()} stored{self._int8()}"


class CsrConv2d(_Packed):
    """conv2d as a sparse GEMM over im2col columns: W (O, C/g, kh, kw) -> (O, C/g*kh*kw) rows.

    Groups are handled per group: row o belongs to group o // (O/g) and its column indices
    address that group's input channels, so one CSR holds every group's block of the diagonal.
    """

    def __init__(self, matrix: SparseMatrix, weight_shape: tuple[int, int, int, int],
                 bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.out_channels = self.weight_shape[0]
        self.in_channels = self.weight_shape[1] * groups
        self.kernel_size = self.weight_shape[2:]
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = int(groups)
        self._store(matrix, bias, scale)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, block: tuple[int, int] = CSR) -> "CsrConv2d":
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError("only explicit zero padding can be packed")
        w = layer.weight.detach()
        return cls(pack(w.reshape(w.shape[0], -1), block), tuple(w.shape), layer.bias,
                   layer.stride, layer.padding, layer.dilation, layer.groups)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        o, cg, kh, kw = self.weight_shape
        return (o, cg * kh * kw)

    def to_dense(self) -> nn.Conv2d:
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                          self.padding, self.dilation, self.groups, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.matrix().to_dense().reshape(self.weight_shape))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rwdeploy.sparse_conv2d(
            x, self.values, self.indices, self.indptr, self.bias, list(self.weight_shape),
            list(self.block), list(self.stride), list(self.padding), list(self.dilation),
            self.groups, self.scale)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.out_channels}, k={self.kernel_size}, s={self.stride}, "
                f"p={self.padding}, g={self.groups}, {self.format}, {self.values.numel()} stored{self._int8()}")


PACKED_TYPES = (CsrLinear, CsrConv2d)


def unpack_module(module: nn.Module) -> nn.Module:
    """The dense equivalent of a packed layer (other modules are returned as they are)."""
    return module.to_dense() if isinstance(module, PACKED_TYPES) else module
