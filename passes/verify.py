"""Closeness of two computations of the same function: the one check every stage uses.

One definition of "close", for torch slim vs original, packed vs slim, ONNX Runtime vs torch,
TVM vs torch, device vs torch and the quantized exports (`compare`, `compare_all`):

    max_abs = max |output - reference|                      over every output of every probe
    max_rel = max over probes of  max|output - reference| / max|reference|

The error is relative to the output's scale, not element by element, so near-zero logits do not
blow it up; a reference of all zeros makes max_rel the absolute error. A comparison passes when
max_rel <= tolerance (`--tolerance`); NaN, and outputs of another shape, never pass.

`verify_equivalence` runs two models on the probe inputs; when they differ, both graphs are run
node by node and the first node (in topological order) whose slim value differs from the
original's, restricted to the kept channels, is named.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import fx, nn

from rwdeploy.passes.trace import node_values


@runtime_checkable
class ChannelMap(Protocol):
    """What locating a divergence needs from a pass's record (e.g. `RemovalRecord`): per node,
    the kept indices along each dim, and which node now carries a node's value. Structural, so
    that verification does not depend on the passes it checks."""

    kept_indices: dict[str, dict[int, list[int]]]
    aliases: dict[str, str]


@dataclass(frozen=True)
class Closeness:
    """How far an output is from its reference (see the module docstring)."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance: float = 1e-4
    mismatch: str | None = None  # why the outputs are not comparable at all (shapes, count)

    @property
    def passed(self) -> bool:
        return self.mismatch is None and self.max_rel <= self.tolerance  # False for NaN

    def worst(self, other: Closeness) -> Closeness:
        """Both comparisons together: the larger errors (NaN wins), the first mismatch."""
        return replace(self, max_abs=_larger(self.max_abs, other.max_abs),
                       max_rel=_larger(self.max_rel, other.max_rel), mismatch=self.mismatch or other.mismatch)

    def to_dict(self) -> dict[str, float]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel}


def _larger(a: float, b: float) -> float:
    return a if math.isnan(a) or a >= b else b


def _arrays(out: Any) -> list[np.ndarray]:
    """A model's output(s) as float64 arrays: a tensor, an array, or nested tuples/lists/dicts."""
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().double().numpy()]
    if isinstance(out, np.ndarray):
        return [out.astype(np.float64, copy=False)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _arrays(o)]
    return []


def compare(reference: Any, output: Any, *, tolerance: float) -> Closeness:
    """`output` against `reference` (one probe's outputs: tensors or arrays, possibly nested)."""
    refs, outs = _arrays(reference), _arrays(output)
    if len(refs) != len(outs) or any(r.shape != o.shape for r, o in zip(refs, outs)):
        shapes = lambda arrays: ", ".join(str(tuple(a.shape)) for a in arrays)  # noqa: E731
        return Closeness(math.inf, math.inf, tolerance, f"output {shapes(outs)} != reference {shapes(refs)}")
    diffs = [float(np.max(np.abs(r - o))) for r, o in zip(refs, outs) if r.size]
    diff = math.nan if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0)
    scale = max((float(np.max(np.abs(r))) if r.size else 0.0 for r in refs), default=0.0)
    return Closeness(diff, diff / scale if scale > 0 else diff, tolerance)


def compare_all(pairs: Iterable[tuple[Any, Any]], *, tolerance: float) -> Closeness:
    """The worst of `compare(reference, output)` over (reference, output) pairs, one per probe."""
    result = Closeness(tolerance=tolerance)
    for reference, output in pairs:
        result = result.worst(compare(reference, output, tolerance=tolerance))
    return result


def compare_on(reference: Callable[[Any], Any], candidate: Callable[[Any], Any], probes: Iterable[Any], *,
               tolerance: float) -> Closeness:
    """`candidate(x)` against `reference(x)` on every probe `x` (torch calls without autograd)."""
    with torch.no_grad():
        return compare_all(((reference(x), candidate(x)) for x in probes), tolerance=tolerance)


@dataclass
class VerificationResult:
    max_abs: float
    max_rel: float
    passed: bool
    first_diverging_node: str | None = None
    probes: int = 0
    rtol: float = 1e-4

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "passed": self.passed,
                "rtol": self.rtol, "probes": self.probes, "first_diverging_node": self.first_diverging_node}


def verify_equivalence(original: nn.Module, slim: nn.Module, probe_inputs: Iterable[Any], *,
                       rtol: float = 1e-4, record: ChannelMap | None = None) -> VerificationResult:
    """Run both models on every probe; `record` (a RemovalRecord) helps locate a divergence."""
    total, probes, worst_args, worst_rel = Closeness(tolerance=rtol), 0, None, -1.0
    with torch.no_grad():
        for x in probe_inputs:
            args = x if isinstance(x, tuple) else (x,)
            probes += 1
            this = compare(original(*args), slim(*args), tolerance=rtol)
            total = total.worst(this)
            if this.mismatch:
                return VerificationResult(math.inf, math.inf, False, "output", probes, rtol)
            if worst_args is None or not this.max_rel <= worst_rel:  # NaN counts as the worst
                worst_args, worst_rel = args, this.max_rel
    first = None
    if not total.passed and worst_args is not None:
        first = first_diverging_node(original, slim, worst_args, rtol=rtol, record=record)
    return VerificationResult(total.max_abs, total.max_rel, total.passed, first, probes, rtol)


def _values(model: nn.Module, args: tuple) -> tuple[fx.GraphModule, dict[str, Any]]:
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    return gm, node_values(gm, args)


def first_diverging_node(original: nn.Module, slim: nn.Module, args: tuple, *, rtol: float = 1e-4,
                         record: ChannelMap | None = None) -> str | None:
    """Name of the first node whose slim value differs from the original's on kept channels.

    Intermediate values are compared like outputs (`compare`), ignoring differences below 1e-6
    in absolute terms: a node whose values are all near zero is not where a model diverges.
    """
    try:
        gm, ref = _values(original, args)
        _, got = _values(slim, args)
    except Exception:  # noqa: BLE001 - a model fx cannot trace simply has no per-node report
        return None
    kept = record.kept_indices if record is not None else {}
    aliases = record.aliases if record is not None else {}
    for node in gm.graph.nodes:
        r = ref.get(node.name)
        g = got.get(aliases.get(node.name, node.name))
        if not isinstance(r, torch.Tensor) or not isinstance(g, torch.Tensor) or node.op == "get_attr":
            continue
        for dim, idx in kept.get(node.name, {}).items():
            r = r.index_select(dim, torch.tensor(idx, dtype=torch.long))
        check = compare(r, g, tolerance=rtol)
        if check.mismatch or (not check.passed and check.max_abs > 1e-6):
            return node.name
    return None


# A model can be ill-conditioned in float32 at some inputs (a trained-looking LeViT at 224 on
# inputs of scale 5): float32 rounding alone then moves its output by more than the tolerance,
# and two float32 evaluations of the same function (original and slim, or torch and ONNX
# Runtime) differ by as much. Such a difference says nothing about the rewrite; these helpers
# separate the two by evaluating in float64.
NOISE_FACTOR = 4.0  # two float32 evaluations each sit about the noise floor away from the truth, in any direction


def in_float64(module: nn.Module) -> nn.Module | None:
    """A float64 copy of `module`, or None where it cannot be made."""
    import copy

    try:
        return copy.deepcopy(module).double()
    except Exception:  # noqa: BLE001 - a module that cannot be copied or cast: no float64 evidence
        return None


def float64_agreement(original: nn.Module, slim: nn.Module, probes: Iterable[torch.Tensor], *,
                      tolerance: float) -> Closeness | None:
    """`slim` against `original`, both evaluated in float64 on the probes; None where either
    does not run in float64 (a graph that fixes a dtype)."""
    o64, s64 = in_float64(original), in_float64(slim)
    if o64 is None or s64 is None:
        return None
    try:
        return compare_on(o64, s64, [x.double() for x in probes], tolerance=tolerance)
    except Exception:  # noqa: BLE001
        return None


def float32_noise(original: nn.Module, probes: Iterable[torch.Tensor]) -> float | None:
    """How far float32 rounding alone moves `original`'s output on the probes: max_rel of its
    float32 evaluation against its float64 one (None where it does not run in float64)."""
    o64 = in_float64(original)
    if o64 is None:
        return None
    try:
        return compare_on(lambda x: o64(x.double()), original, list(probes), tolerance=math.inf).max_rel
    except Exception:  # noqa: BLE001
        return None
