"""The quantization record of a `.pt2` program: what `rwdeploy compile` needs to ship integer weights.

A quantized model's weights are integers times power-of-two scales (`rwdeploy.quant.convert`);
the `QuantSpec` says so (bits, per-channel or not, which weights). An rwdeploy checkpoint keeps
it in its metadata; a `torch.export` program keeps it as the extra file `QUANT_FILE` of its
archive, written by `save_quantized_program` (or `torch.export.save(..., extra_files=
quant_extra_files(spec))`). A `.pt2` without that file compiles as the float model it holds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rwdeploy.errors import ModelFileError
from rwdeploy.quant.fixed_point import SUPPORTED_BITS
from rwdeploy.quant.qat import QuantSpec

QUANT_FILE = "rwdeploy/quantization.json"  # inside the archive: <name>/extra/rwdeploy/quantization.json


def quant_extra_files(spec: QuantSpec | dict[str, Any] | None,
                      program: torch.export.ExportedProgram | None = None) -> dict[str, str]:
    """`extra_files` for torch.export.save that carry `spec` (nothing for None). With `program`,
    only the weights it still holds (a packed layer holds CSR arrays instead); none: nothing."""
    if spec is None:
        return {}
    spec = QuantSpec.from_dict(spec) if isinstance(spec, dict) else spec
    if program is not None:
        spec = QuantSpec(spec.bits, spec.per_channel, {k: v for k, v in spec.layers.items() if k in program.state_dict})
        if not spec.layers:
            return {}
    return {QUANT_FILE: json.dumps(spec.to_dict(), sort_keys=True)}


def save_quantized_program(program: torch.export.ExportedProgram, path: str | os.PathLike, spec: QuantSpec) -> None:
    """Save `program` (exported from a model quantized with `rwdeploy.quant`) with its `spec`,
    so that `rwdeploy compile` exports its weights as integers (QDQ ONNX, int8 TVM build)."""
    missing = sorted(set(spec.layers) - set(program.state_dict))
    if missing:
        raise ValueError(f"the quantization spec names weight {missing[0]!r}, which the program does not hold "
                         f"(its weights: {', '.join(sorted(program.state_dict)[:4])}, ...)")
    torch.export.save(program, str(path), extra_files=quant_extra_files(spec))


def quant_metadata(extra_files: dict[str, Any], program: torch.export.ExportedProgram,
                   path: Path) -> dict[str, Any]:
    """{"quantization": spec dict} from a loaded program's extra files, {} when it has none;
    a record that is not one, or names weights the program lacks, is a ModelFileError."""
    text = extra_files.get(QUANT_FILE)
    if not text:
        return {}
    try:
        spec = QuantSpec.from_dict(json.loads(text))
        if spec.bits not in SUPPORTED_BITS:
            raise ValueError(f"{spec.bits} bits, not one of {SUPPORTED_BITS}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelFileError(f"{path}: damaged quantization record {QUANT_FILE} ({type(err).__name__}: {err})",
                             hint="save the program again with rwdeploy.quant.save_quantized_program") from None
    missing = sorted(set(spec.layers) - set(program.state_dict))
    if missing:
        raise ModelFileError(f"{path}: the quantization record names weight {missing[0]!r}, which the program "
                             "does not hold", hint="save the program and its spec from the same quantized model "
                                                   "with rwdeploy.quant.save_quantized_program")
    return {"quantization": spec.to_dict()}
