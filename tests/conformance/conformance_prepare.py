"""Turn a timm architecture into a conformance case: a model that looks pruned, in two files.

For one suite entry at one input size:

1. build it with timm (random init, `pretrained=False`: nothing is downloaded);
2. give it trained-looking weights: every parameter timm initialises to one repeated value
   (norm affines, biases, layer scales, zero-initialised gains and heads, attention biases)
   gets a non-trivial random one, and BatchNorm running statistics are calibrated on random
   batches of the case's input size;
3. for RepVGG/MobileOne/FastViT-style entries marked `deploy`, fuse the branches
   (`timm.utils.reparameterize_model`), the form such a model ships in;
4. zero 30-50% of the output filters of every convolution and of the rows of every hidden
   Linear (every Linear but the classifier), chosen at random from a seed derived from the
   model and layer names, without looking at rwdeploy's channel groups;
5. save it as a `torch.export` program (`.pt2`, batch dimension dynamic where the model
   allows) and as a whole pickled module (loaded with `trust_pickle`).

Everything is seeded: the same entry and size give bit-identical weights and files.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conformance_models import ModelSpec
from torchvision_shim import import_timm

ZERO_RATE = (0.3, 0.5)  # fraction of each layer's filters that gets zeroed, drawn per layer
CALIBRATION_BATCHES = 3
CALIBRATION_BATCH_SIZE = 8
FORMS = ("pt2", "pickle")


def seed_of(*parts: Any) -> int:
    """A stable 31-bit seed from names (Python's hash() is salted per process)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class PreparedModel:
    spec: ModelSpec
    size: int  # input side (height = width)
    module: nn.Module  # the zeroed model, eval mode: the reference every check compares against
    input_shape: tuple[int, ...]  # (1, C, size, size)
    zeroed: dict[str, list[int]] = field(default_factory=dict)  # layer name -> zeroed output filters
    layers: int = 0  # convs + hidden Linears considered (each with >= 2 outputs)

    @property
    def zeroed_filters(self) -> int:
        return sum(len(v) for v in self.zeroed.values())

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        shape = (batch, *self.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build(spec: ModelSpec, size: int) -> nn.Module:
    """The architecture at input side `size`, random init (eval mode)."""
    timm = import_timm()
    kwargs = dict(spec.kwargs)
    if size != spec.default and spec.img_size_kwarg:
        kwargs["img_size"] = size
    torch.manual_seed(seed_of(spec.name, "init"))
    return timm.create_model(spec.arch, pretrained=False, **kwargs).eval()


def _reinit_constant(p: torch.Tensor, gen: torch.Generator) -> None:
    """A parameter initialised to one repeated value gets a random one of the same kind."""
    flat = p.detach().reshape(-1)
    if flat.numel() == 0 or not bool((flat == flat[0]).all()):
        return
    value = float(flat[0])
    with torch.no_grad():
        if p.dim() >= 2 and value == 0.0:  # a zero-initialised weight matrix (a head)
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
        elif value == 0.0:  # biases, norm shifts, zero-initialised gains and attention biases
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        elif abs(value) < 1e-3:  # layer scales (1e-5, 1e-6): trained ones are far larger
            p.copy_(0.1 + 0.9 * torch.rand(p.shape, generator=gen))
        else:  # norm scales, gains: around their initial value
            p.mul_(0.5 + torch.rand(p.shape, generator=gen))


def calibrate_batchnorm(module: nn.Module, input_shape: tuple[int, ...], seed: int) -> int:
    """Running statistics of every BatchNorm from random batches (the rest stays in eval mode)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    gen = torch.Generator().manual_seed(seed)
    momenta = [bn.momentum for bn in bns]
    module.eval()
    for bn in bns:
        if bn.track_running_stats:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_BATCHES):
            module(torch.randn((CALIBRATION_BATCH_SIZE, *input_shape[1:]), generator=gen))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    module.eval()
    return len(bns)


def make_trained_looking(module: nn.Module, input_shape: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        _reinit_constant(p, gen)
    calibrate_batchnorm(module, input_shape, seed + 1)


def classifier_modules(module: nn.Module) -> set[int]:
    """ids of the modules that produce the logits (their outputs are the model's output)."""
    heads: Any = module.get_classifier() if hasattr(module, "get_classifier") else None
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    out: set[int] = set()
    for head in heads:
        if isinstance(head, nn.Module):
            out |= {id(m) for m in head.modules()}
    return out


def zero_filters(module: nn.Module, seed: int) -> tuple[dict[str, list[int]], int]:
    """Zero 30-50% of the output filters of every conv and hidden Linear, in place.

    Returns (layer name -> zeroed filter indices, number of layers considered). Only the
    weight rows are zeroed: biases and the norms after them keep their values, so a removed
    filter still carries a constant that the slim model has to fold.
    """
    heads = classifier_modules(module)
    zeroed: dict[str, list[int]] = {}
    layers = 0
    for name, m in module.named_modules():
        if id(m) in heads or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            continue  # output channels on dim 1 per group; classification nets have none
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        n = m.weight.shape[0]
        if n < 2:
            continue
        layers += 1
        gen = torch.Generator().manual_seed(seed_of(seed, name))
        rate = ZERO_RATE[0] + (ZERO_RATE[1] - ZERO_RATE[0]) * float(torch.rand((), generator=gen))
        count = max(1, round(rate * n))
        idx = sorted(torch.randperm(n, generator=gen)[:count].tolist())
        with torch.no_grad():
            m.weight[idx] = 0
        zeroed[name] = idx
    return zeroed, layers


def prepare(spec: ModelSpec, size: int) -> PreparedModel:
    """Build, make trained-looking, (fuse,) zero: the reference model of a case."""
    module = build(spec, size)
    input_shape = (1, spec.channels, size, size)
    seed = seed_of(spec.name, size)
    make_trained_looking(module, input_shape, seed)
    if spec.deploy:
        timm = import_timm()
        module = timm.utils.reparameterize_model(module).eval()
    zeroed, layers = zero_filters(module, seed)
    return PreparedModel(spec, size, module, input_shape, zeroed, layers)


def save_pt2(prepared: PreparedModel, path: Path) -> bool:
    """`torch.export` program; returns whether the batch dimension is dynamic."""
    module = prepared.module
    with torch.no_grad():
        try:
            batch = torch.export.Dim("batch")
            program = torch.export.export(module, (prepared.example_input(batch=2),),
                                          dynamic_shapes=({0: batch},))
            dynamic = True
        except Exception:  # noqa: BLE001 - a model that fixes its batch size exports static
            program = torch.export.export(module, (prepared.example_input(),))
            dynamic = False
    torch.export.save(program, str(path))
    return dynamic


def save_pickle(prepared: PreparedModel, path: Path) -> None:
    torch.save(prepared.module, str(path))


def save(prepared: PreparedModel, form: str, folder: Path) -> tuple[Path, dict[str, Any]]:
    """Write the model in `form` ("pt2" | "pickle") into `folder`; (path, facts about it)."""
    if form == "pt2":
        path = folder / f"{prepared.spec.arch}.pt2"
        return path, {"dynamic_batch": save_pt2(prepared, path)}
    if form == "pickle":
        path = folder / f"{prepared.spec.arch}.pt"
        save_pickle(prepared, path)
        return path, {}
    raise ValueError(f"unknown form {form!r} (one of {', '.join(FORMS)})")
