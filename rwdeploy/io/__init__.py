"""Model files in and out."""
from __future__ import annotations

from rwdeploy.io.atomic import atomic_dir, atomic_file
from rwdeploy.io.checkpoint import Checkpoint, save_checkpoint
from rwdeploy.io.load import LoadedModel, load_model, load_zoo
from rwdeploy.io.shapes import parse_input_shape

__all__ = [
    "Checkpoint",
    "LoadedModel",
    "atomic_dir",
    "atomic_file",
    "load_model",
    "load_zoo",
    "parse_input_shape",
    "save_checkpoint",
]
