"""Turn an nn.Module into a torch.fx GraphModule: symbolic tracing first, torch.export as fallback."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from rwdeploy.errors import ModelFileError


class _NodeValues(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep: Callable[[Any], Any], names: set[str] | None) -> None:
        super().__init__(gm)
        self.keep, self.names, self.values = keep, names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.names is None or n.name in self.names:
            self.values[n.name] = self.keep(out)
        return out


def node_values(gm: fx.GraphModule, inputs: Any, keep: Callable[[Any], Any] = lambda v: v,
                names: set[str] | None = None) -> dict[str, Any]:
    """Node name -> `keep(its output)` for every node (or those in `names`), from one run of `gm`
    on `inputs` (a tensor or a tuple of inputs), without autograd."""
    interpreter = _NodeValues(gm, keep, names)
    with torch.no_grad():
        interpreter.run(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    return interpreter.values


@dataclass
class TraceResult:
    gm: fx.GraphModule
    method: str  # "symbolic_trace" or "torch.export"
    fallback_reason: str | None = None  # why symbolic tracing was not used

    def to_dict(self) -> dict:
        return {"method": self.method, "fallback_reason": self.fallback_reason}


def trace_model(module: nn.Module, example_input: torch.Tensor) -> TraceResult:
    """Trace `module`; the GraphModule keeps the module's state_dict keys.

    `symbolic_trace` keeps submodules as `call_module` nodes, which the channel passes edit.
    Models with data-dependent Python control flow cannot be traced symbolically; they go
    through `torch.export(...).module()`, whose graph holds aten ops (analysed conservatively).
    """
    was_training = module.training
    module.eval()
    try:
        gm = fx.symbolic_trace(module)
        with torch.no_grad():
            gm(example_input)  # a trace that cannot run is not a trace
        return TraceResult(gm, "symbolic_trace")
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: try torch.export
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        module.train(was_training)
    try:
        module.eval()
        with torch.no_grad():
            gm = torch.export.export(module, (example_input,)).module()
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(
            f"model {type(module).__name__} can be traced neither by torch.fx ({reason}) "
            f"nor by torch.export ({type(exc).__name__})",
            hint="remove data-dependent control flow from forward()",
        ) from exc
    finally:
        module.train(was_training)
    original = set(module.state_dict())
    missing = original - set(gm.state_dict())
    if missing:
        raise ModelFileError(
            f"torch.export renamed parameters of {type(module).__name__} (e.g. {sorted(missing)[0]})",
            hint="make the model traceable by torch.fx.symbolic_trace",
        )
    return TraceResult(gm, "torch.export", reason)
