"""Quantization-aware retraining: Conv/Linear layers compute with fake-quantized weights.

`prepare_qat` switches each selected layer's class to a fake-quant subclass in place. The
parameters stay the same objects under the same names, so optimizers, masks (keyed by
parameter name) and checkpoints keep working unchanged; the float weights are the "shadow"
weights the straight-through estimator updates. A mask is applied before quantizing, so a
pruned weight is exactly 0 in every forward whatever the optimizer does.

`convert` ends QAT: it writes the dequantized values (integers times power-of-two scales,
exact in float32) into the weights, restores the plain classes and returns the
`QuantSpec` that `compile` needs to export integer weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.quant.fixed_point import check_bits, fake_quantize, power_of_two_scale, quantize


@dataclass
class QuantSpec:
    """What was quantized: bit width, granularity, and per layer the scales (axis 0 when per-channel)."""

    bits: int
    per_channel: bool
    layers: dict[str, list[float]] = field(default_factory=dict)  # weight name -> scale(s)

    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "per_channel": self.per_channel, "scheme": "symmetric, power-of-two scales",
                "layers": {k: list(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        return cls(int(d["bits"]), bool(d["per_channel"]), {k: [float(x) for x in v] for k, v in d["layers"].items()})


class _FakeQuantMixin:
    """Forward with weight = fake_quantize(weight * mask); set up by `prepare_qat`."""

    qat_bits: int
    qat_axis: int | None
    qat_mask: torch.Tensor | None

    def qat_weight(self) -> torch.Tensor:
        w = self.weight  # type: ignore[attr-defined]
        if self.qat_mask is not None:
            w = w * self.qat_mask
        return fake_quantize(w, self.qat_bits, self.qat_axis)


class FakeQuantConv2d(_FakeQuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qat_weight(), self.bias)


class FakeQuantConv1d(_FakeQuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.qat_weight(), self.bias)


class FakeQuantLinear(_FakeQuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qat_weight(), self.bias)


_FAKE_CLASS = {nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d, nn.Linear: FakeQuantLinear}
_PLAIN_CLASS = {v: k for k, v in _FAKE_CLASS.items()}


def quantizable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Conv1d / Conv2d / Linear layers by module name (exact classes: subclasses may change forward)."""
    skip = set(exclude)
    return {n: m for n, m in model.named_modules()
            if (type(m) in _FAKE_CLASS or type(m) in _PLAIN_CLASS) and n not in skip}


def prepare_qat(model: nn.Module, bits: int, *, per_channel: bool = False,
                masks: dict[str, torch.Tensor] | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Make Conv2d/Linear layers of `model` compute with fake-quantized (masked) weights, in place.

    Returns the names of the layers switched. `masks` maps weight names (``"conv1.weight"``) to
    bool tensors, True = kept.
    """
    bits = check_bits(bits)
    masks = masks or {}
    names = []
    for name, m in quantizable_layers(model, exclude).items():
        mask = masks.get(f"{name}.weight" if name else "weight")
        if mask is not None and tuple(mask.shape) != tuple(m.weight.shape):
            raise OptionError(f"mask for {name}.weight has shape {tuple(mask.shape)}, weight is {tuple(m.weight.shape)}",
                              hint="use the masks saved with this checkpoint")
        m.__class__ = _FAKE_CLASS.get(type(m), type(m))
        m.qat_bits, m.qat_axis = bits, (0 if per_channel else None)
        m.qat_mask = None if mask is None else mask.to(m.weight.device, m.weight.dtype)
        names.append(name)
    if not names:
        raise OptionError("--quantize: the model has no Conv1d, Conv2d or Linear layer to quantize")
    return names


@torch.no_grad()
def convert(model: nn.Module) -> QuantSpec:
    """Bake fake-quantized weights into `model` (in place), restore plain layers, return the spec."""
    spec: QuantSpec | None = None
    for name, m in model.named_modules():
        if not isinstance(m, _FakeQuantMixin):
            continue
        if spec is None:
            spec = QuantSpec(m.qat_bits, m.qat_axis is not None)
        w = m.weight if m.qat_mask is None else m.weight * m.qat_mask
        scale = power_of_two_scale(w, m.qat_bits, m.qat_axis)
        q = quantize(w, scale, m.qat_bits, m.qat_axis)
        m.weight.copy_(m.qat_weight())
        # The baked weights must be exactly integers times the scales: the exporter relies on it.
        assert torch.equal(quantize(m.weight, scale, m.qat_bits, m.qat_axis), q)
        spec.layers[f"{name}.weight"] = [float(s) for s in scale.flatten()]
        m.__class__ = _PLAIN_CLASS[type(m)]
        for attr in ("qat_bits", "qat_axis", "qat_mask"):
            delattr(m, attr)
    if spec is None:
        raise OptionError("convert: the model was not prepared for quantization", hint="call prepare_qat first")
    return spec


def quantize_model(model: nn.Module, bits: int, *, per_channel: bool = False,
                   masks: dict[str, torch.Tensor] | None = None, exclude: Iterable[str] = ()) -> QuantSpec:
    """Post-training quantization in place (prepare + convert, no retraining)."""
    prepare_qat(model, bits, per_channel=per_channel, masks=masks, exclude=exclude)
    return convert(model)
