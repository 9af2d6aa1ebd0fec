"""Check that a transformed model computes the same function as the original, on probe inputs.

The error is relative to the output's scale: max_rel = max|slim - original| / max|original|
(over all probes and outputs), which stays meaningful where single outputs are near zero.
When it fails, both graphs are run node by node and the first node (in topological order)
whose slim value differs from the original's, restricted to the kept channels, is named.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import fx, nn


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


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def verify_equivalence(original: nn.Module, slim: nn.Module, probe_inputs: Iterable[Any], *,
                       rtol: float = 1e-4, record: Any = None) -> VerificationResult:
    """Run both models on every probe; `record` (a RemovalRecord) helps locate a divergence."""
    max_abs, scale, probes, worst = 0.0, 0.0, 0, None
    with torch.no_grad():
        for x in probe_inputs:
            args = x if isinstance(x, tuple) else (x,)
            ref, got = _flat(original(*args)), _flat(slim(*args))
            if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
                return VerificationResult(float("inf"), float("inf"), False, "output", probes + 1, rtol)
            probes += 1
            for r, g in zip(ref, got):
                err = float((r.double() - g.double()).abs().max()) if r.numel() else 0.0
                if err > max_abs or worst is None:
                    worst = args
                max_abs = max(max_abs, err)
                scale = max(scale, float(r.double().abs().max()) if r.numel() else 0.0)
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    passed = max_rel <= rtol and max_abs == max_abs  # NaN never passes
    first = None
    if not passed and worst is not None:
        first = first_diverging_node(original, slim, worst, rtol=rtol, record=record)
    return VerificationResult(max_abs, max_rel, passed, first, probes, rtol)


class _AllValues(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _values(model: nn.Module, args: tuple) -> tuple[fx.GraphModule, dict[str, Any]]:
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    rec = _AllValues(gm)
    with torch.no_grad():
        rec.run(*args)
    return gm, rec.values


def first_diverging_node(original: nn.Module, slim: nn.Module, args: tuple, *, rtol: float = 1e-4,
                         record: Any = None) -> str | None:
    """Name of the first node whose slim value differs from the original's on kept channels."""
    try:
        gm, ref = _values(original, args)
        _, got = _values(slim, args)
    except Exception:  # noqa: BLE001 - a model fx cannot trace simply has no per-node report
        return None
    kept = getattr(record, "kept_indices", {}) or {}
    aliases = getattr(record, "aliases", {}) or {}
    for node in gm.graph.nodes:
        r = ref.get(node.name)
        g = got.get(aliases.get(node.name, node.name))
        if not isinstance(r, torch.Tensor) or not isinstance(g, torch.Tensor) or node.op == "get_attr":
            continue
        for dim, idx in kept.get(node.name, {}).items():
            r = r.index_select(dim, torch.tensor(idx, dtype=torch.long))
        if r.shape != g.shape:
            return node.name
        s = float(r.double().abs().max()) if r.numel() else 0.0
        err = float((r.double() - g.double()).abs().max()) if r.numel() else 0.0
        if err > rtol * max(s, 1e-12) and err > 1e-6:
            return node.name
    return None
