"""The model zoo: one registry of network definitions with their default input shapes.

    >>> from rwdeploy import models
    >>> net = models.create("resnet20", num_classes=10)
    >>> models.input_shape("resnet20")
    (1, 3, 32, 32)
"""
from __future__ import annotations

from rwdeploy.models.registry import ZooEntry, create, entry, input_shape, list_models, register

# `models.list()` reads naturally at call sites; `list_models` avoids shadowing the builtin.
list = list_models  # noqa: A001

# Importing the definitions fills the registry.
from rwdeploy.models import cifar, imagenet, lenet  # noqa: E402,F401

__all__ = ["ZooEntry", "create", "entry", "input_shape", "list", "list_models", "register"]
