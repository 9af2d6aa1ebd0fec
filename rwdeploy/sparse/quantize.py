"""Sparse and int8 together: packed layers whose CSR/BSR values are int8 with float32 scales.

`quantize_packed(module, per_row=True)` returns a copy of `module` in which every packed layer
(`CsrLinear` / `CsrConv2d`) stores int8 values and a scale per weight row (`per_row=False`:
one scale for the whole layer, repeated per row). Scales are powers of two, the scheme of
`rwdeploy.quant` (symmetric, nothing clipped): for weights that are already 8-bit fixed point
(a checkpoint from `rwdeploy prune --quantize 8`) the int8 values times their scales give back
exactly the same float32 weights, so the int8 layers compute the same function; for float
weights the record says how far they moved (at most half a scale step each).

The TVM kernels read the int8 values, convert them to float and apply the row scale once per
output (in the epilogue): 1 byte per stored value instead of 4. Activations stay float32.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rwdeploy.quant.fixed_point import power_of_two_scale, quantize
from rwdeploy.sparse.modules import PACKED_TYPES

BITS = 8


@dataclass
class QuantizedLayer:
    name: str
    scales: str                  # "per row" | "per layer"
    values: int                  # stored values (int8 now)
    bytes_before: int
    bytes_after: int
    max_abs_change: float        # largest |w_int8 * scale - w| over the stored values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizeRecord:
    bits: int
    per_row: bool
    layers: list[QuantizedLayer] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "per_row": self.per_row, "layers": [l.to_dict() for l in self.layers]}


def _quantize_layer(layer: nn.Module, per_row: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(int8 values, float32 scale per row, max |change|) of one packed layer."""
    m = layer.matrix()                                    # float32 values, whatever is stored
    rows, br = m.shape[0], m.block[0]
    block_row = torch.repeat_interleave(torch.arange(rows // br), (m.indptr[1:] - m.indptr[:-1]).to(torch.int64))
    values = m.values                                     # (nnzb, br, bc)
    if values.numel() == 0:
        return values.to(torch.int8), torch.ones(rows), 0.0
    if per_row:
        amax = torch.zeros(rows // br, br).scatter_reduce_(
            0, block_row[:, None].expand(-1, br), values.abs().amax(dim=2), "amax")
        scale = power_of_two_scale(amax.reshape(rows), BITS, axis=0)
    else:
        scale = power_of_two_scale(values, BITS).expand(rows).clone()
    row_scale = scale.reshape(rows // br, br, 1)[block_row]
    q = quantize(values, row_scale, BITS)
    change = float((q.float() * row_scale - values).abs().max())
    return q, scale, change


def quantize_packed(module: nn.Module, per_row: bool = True) -> tuple[nn.Module, QuantizeRecord]:
    """A copy of `module` whose packed layers hold int8 values and float32 row scales."""
    new = copy.deepcopy(module)
    record = QuantizeRecord(BITS, per_row)
    for name, layer in new.named_modules():
        if not isinstance(layer, PACKED_TYPES):
            continue
        before = layer.packed_bytes()
        q, scale, change = _quantize_layer(layer, per_row)
        layer.values = q
        layer.scale = scale
        record.layers.append(QuantizedLayer(name, "per row" if per_row else "per layer", int(q.numel()),
                                            before, layer.packed_bytes(), change))
    return new, record
