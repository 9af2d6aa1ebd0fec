"""Storage size of a pruned and quantized model, counted from its weights (not from a file).

Three figures per model: dense float32; dense b-bit; and sparse b-bit, where only the nonzero
weights are stored at b bits plus a 1-bit-per-weight occupancy bitmap, and the scales at 32 bits
each (`best_bytes` is the smaller of the two b-bit layouts). Parameters that are not quantized (biases, BN) count as float32 in all three.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rwdeploy.quant.qat import QuantSpec


def model_size(model: nn.Module, spec: QuantSpec | None = None) -> dict[str, Any]:
    """Sizes of `model`'s parameters; the weights named in `spec.layers` count as quantized.

    Scales are counted from the weights' shapes (one per output channel when per-channel), so
    the same spec also sizes a slim model whose layers lost channels.
    """
    params = dict(model.named_parameters())
    quantized = set(spec.layers) if spec is not None else set()
    bits = spec.bits if spec is not None else 32
    float_bits = 0
    dense_q_bits = 0
    sparse_q_bits = 0
    weights_total = 0
    weights_nonzero = 0
    for name, p in params.items():
        n = p.numel()
        float_bits += 32 * n
        if name in quantized:
            nnz = int(torch.count_nonzero(p.detach()))
            scales = 32 * (p.shape[0] if spec.per_channel else 1)
            dense_q_bits += bits * n + scales
            sparse_q_bits += bits * nnz + n + scales
            weights_total += n
            weights_nonzero += nnz
        else:
            dense_q_bits += 32 * n
            sparse_q_bits += 32 * n
    to_bytes = lambda b: (b + 7) // 8  # noqa: E731
    return {
        "bits": bits,
        "float32_bytes": to_bytes(float_bits),
        "dense_quantized_bytes": to_bytes(dense_q_bits),
        "sparse_quantized_bytes": to_bytes(sparse_q_bits),
        "quantized_weights": weights_total,
        "quantized_weights_nonzero": weights_nonzero,
        # the smaller of the two layouts is what a deployment would store
        "best_bytes": to_bytes(min(dense_q_bits, sparse_q_bits)),
        "compression_vs_float32": round(float_bits / max(min(dense_q_bits, sparse_q_bits), 1), 2),
        "counting": "sparse = nonzero values at b bits + 1-bit occupancy bitmap + 32-bit scales; others float32",
    }
