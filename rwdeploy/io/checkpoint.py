"""The rwdeploy checkpoint: a zoo name, its state_dict, the input shape, masks and metadata.

It is a plain dict of tensors and primitives saved with `torch.save`, so it loads with
`weights_only=True` (no code runs at load time).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from rwdeploy.io.atomic import atomic_file

CHECKPOINT_FORMAT = "rwdeploy-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    arch: str
    state_dict: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # parameter name -> bool tensor of the parameter's shape; True keeps the weight.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "arch": self.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "input_shape": list(self.input_shape),
            "masks": {k: v.detach().cpu().bool() for k, v in self.masks.items()},
            "metadata": dict(self.metadata),
        }

    @staticmethod
    def is_checkpoint(obj: Any) -> bool:
        return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "Checkpoint":
        return cls(
            arch=str(obj["arch"]),
            state_dict=dict(obj["state_dict"]),
            input_shape=tuple(int(d) for d in obj["input_shape"]),
            arch_kwargs=dict(obj.get("arch_kwargs") or {}),
            masks=dict(obj.get("masks") or {}),
            metadata=dict(obj.get("metadata") or {}),
        )


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write `ckpt` to `path` atomically."""
    with atomic_file(path) as tmp:
        torch.save(ckpt.to_dict(), tmp)
