"""What every pass returns: a new GraphModule and a record of what it changed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from torch import fx


class Record(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Record)


@dataclass
class PassResult(Generic[R]):
    gm: fx.GraphModule
    record: R
