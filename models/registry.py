"""Registry of zoo networks: a name, a constructor and the input shape it expects."""
from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from rwdeploy.errors import OptionError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # with batch 1
    num_classes: int
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


_ZOO: dict[str, ZooEntry] = {}


def register(name: str, input_shape: tuple[int, ...], num_classes: int, description: str = ""):
    """Decorator: add a constructor `fn(num_classes=..., **kw) -> nn.Module` to the zoo."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ZOO:
            raise ValueError(f"zoo name {name!r} registered twice")
        _ZOO[name] = ZooEntry(name, fn, tuple(input_shape), num_classes, description)
        return fn

    return wrap


def list_models() -> builtins.list[str]:
    """Names of all zoo networks, sorted."""
    return sorted(_ZOO)


def entry(name: str) -> ZooEntry:
    try:
        return _ZOO[name]
    except KeyError:
        raise OptionError(
            f"unknown model {name!r}", hint=f"known models: {', '.join(list_models())}"
        ) from None


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo network in eval mode; `num_classes` and constructor options pass through."""
    e = entry(name)
    kwargs.setdefault("num_classes", e.num_classes)
    model = e.build(**kwargs)
    return model.eval()


def input_shape(name: str) -> tuple[int, ...]:
    """The default input shape (batch 1) of a zoo network."""
    return entry(name).input_shape
