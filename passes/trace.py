"""Turn an nn.Module into a torch.fx GraphModule: symbolic tracing first, torch.export as fallback."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from rwdeploy.errors import ModelFileError
from rwdeploy.passes.inline_autocast import inline_inactive_autocast


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
    through `torch.export(...).module()`, whose graph holds aten ops (analysed conservatively),
    with a dynamic batch dimension where the model allows one (see `_export_batch_dynamic`).
    """
    was_training = module.training
    module.eval()
    try:
        gm = fx.symbolic_trace(module)
        inline_inactive_autocast(gm, example_input.device.type)  # a loaded .pt2: disabled autocast regions
        with torch.no_grad():
            gm(example_input)  # a trace that cannot run is not a trace
        return TraceResult(gm, "symbolic_trace")
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: try torch.export
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        module.train(was_training)
    try:
        module.eval()
        gm = _export_batch_dynamic(module, example_input)
        inline_inactive_autocast(gm, example_input.device.type)
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


def _export_batch_dynamic(module: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """`torch.export(module).module()` with the batch dimension dynamic where the model allows it,
    else at the example's shape. A program exported at the example's batch runs at that batch
    only; the compile would then fix its batch size to that of the example, which for a `.pt2`
    saved with a dynamic batch is the batch the file was saved with, not the user's."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    # An example of batch 1 would specialise the batch dimension to 1; export with 2.
    example = torch.cat([example_input, example_input])[:2]
    with torch.no_grad():
        try:
            return torch.export.export(module, (example,), dynamic_shapes=({0: batch},)).module()
        except Exception:  # noqa: BLE001 - a model that fixes its batch size exports static
            return torch.export.export(module, (example_input,)).module()
