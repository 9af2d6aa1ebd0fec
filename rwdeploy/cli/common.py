"""Options and helpers shared by the subcommands that read a model file."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from rwdeploy.io import LoadedModel, load_model, load_zoo, parse_input_shape

ZOO_PREFIX = "zoo:"


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """MODEL argument plus --arch, --input-shape and --trust-pickle."""

    @click.argument("model", metavar="MODEL")
    @click.option("--arch", default=None, metavar="NAME",
                  help="Zoo architecture of a plain state_dict (see `rwdeploy zoo`).")
    @click.option("--input-shape", "input_shape", default=None, metavar="N,C,H,W",
                  help="Input shape when the file records none, e.g. 1,3,32,32.")
    @click.option("--trust-pickle", is_flag=True,
                  help="Allow a whole pickled module (unpickling runs code from the file).")
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def load_from_cli(model: str, arch: str | None, input_shape: str | None, trust_pickle: bool) -> LoadedModel:
    """MODEL is a file, or `zoo:NAME` for a zoo network with fresh random weights."""
    shape = parse_input_shape(input_shape) if input_shape else None
    if model.startswith(ZOO_PREFIX):
        return load_zoo(model[len(ZOO_PREFIX):], input_shape=shape)
    return load_model(model, arch=arch, input_shape=shape, trust_pickle=trust_pickle)
