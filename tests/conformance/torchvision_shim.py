"""Make `import timm` work in this test environment (test and benchmark code only).

timm imports torchvision, and the only torchvision wheel for torch 2.13 is a CUDA build whose
compiled operators do not load with the CPU torch: its import fails with "operator
torchvision::nms does not exist". Defining the two operator schemas it looks up at import
(`torchvision::nms`, `torchvision::qnms`) with `torch.library` before torchvision is first
imported lets it import; nothing in the conformance suite calls those operators. This lives
beside the tests, never in the rwdeploy package: a user's environment has a torchvision that
matches its torch.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIBRARY: Any = None  # the definitions live as long as this object does


def install() -> None:
    """Define the schemas once per process (a no-op when torchvision is already imported)."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return
    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return  # a working torchvision (or another shim) defined it already
    except RuntimeError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        library.define(f"{name}{_SCHEMA}")
    _LIBRARY = library


def import_timm() -> Any:
    """`import timm`, with the schemas defined first."""
    install()
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"the conformance suite needs timm ({err}): run `bash scripts/setup.sh test` "
                          "(or pip install -e '.[test]')") from err
    return timm
