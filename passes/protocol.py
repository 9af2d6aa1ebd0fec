"""The pass protocol: a pass is a callable `(GraphModule, PassContext) -> PassResult`.

In the spirit of TVM's `relax.transform`: a pass object carries its own options (`mode`,
`analysis`, ...), and one context type carries what any pass may need from outside - the
example input, probe inputs and tolerance, pruning masks, and the measurer a pass that
chooses by speed is given (a pass never measures, prints or exports by itself). A pass
returns a new GraphModule and a record of what it changed; its input is left as it was.
`Sequence` runs passes in order, each on the graph the previous one returned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, TypeVar

import torch
from torch import fx


class Record(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Record)


@dataclass
class PassResult(Generic[R]):
    gm: fx.GraphModule
    record: R


@dataclass
class PassContext:
    example_input: Any  # what the graph is run on to learn shapes (a tensor, or a tuple of inputs)
    probe_inputs: list[Any] = field(default_factory=list)  # inputs a checked Sequence compares on
    tolerance: float = 1e-4  # max relative output error a checked pass may introduce
    masks: dict[str, torch.Tensor] | None = None  # parameter name -> bool mask, True = kept
    # times layers' candidate forms (`pack_sparse`) or channel counts (`remove_zero_channels` align="auto")
    measurer: Callable[..., Any] | None = None
    strict: bool | None = None  # channel-analysis rule errors raise (None: $RWDEPLOY_STRICT_ANALYSIS)


class Pass(Protocol):
    name: str

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...


@dataclass
class SequenceRecord:
    records: dict[str, Record]  # pass name -> its record, in the order the passes ran

    def to_dict(self) -> dict[str, Any]:
        return {name: record.to_dict() for name, record in self.records.items()}


@dataclass
class Sequence:
    """Passes run in order. With `check`, each result is compared with its input on the
    context's probe inputs and a pass that changes the function past the tolerance stops
    the sequence (`VerificationError` naming the pass)."""

    passes: list[Pass]
    check: bool = False
    name: str = "sequence"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult[SequenceRecord]:
        from rwdeploy.errors import VerificationError
        from rwdeploy.passes.verify import ChannelMap, verify_equivalence

        records: dict[str, Record] = {}
        for p in self.passes:
            result = p(gm, ctx)
            if self.check and ctx.probe_inputs:
                where = result.record if isinstance(result.record, ChannelMap) else None  # locates a divergence
                v = verify_equivalence(gm, result.gm, ctx.probe_inputs, rtol=ctx.tolerance, record=where)
                if not v.passed:
                    raise VerificationError(f"pass {p.name} changed the model: max relative error {v.max_rel:.3g} "
                                            f"> tolerance {ctx.tolerance:g} (first diverging at "
                                            f"{v.first_diverging_node or 'the output'})",
                                            hint="this is a bug in that pass, please report it")
            gm, records[p.name] = result.gm, result.record
        return PassResult(gm, SequenceRecord(records))
