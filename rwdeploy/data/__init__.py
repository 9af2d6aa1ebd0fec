"""Datasets for training, never downloaded.

`load_dataset(spec, image_shape)` understands:
  digits                 scikit-learn's bundled 8x8 handwritten digits (real, always present)
  synthetic              class-conditional Gaussian images in the model's input shape
  mnist:DIR              MNIST IDX files
  cifar10:DIR, cifar100:DIR   CIFAR python batches (with random-crop + flip augmentation)
  folder:DIR             an image tree, one sub-folder per class (needs Pillow)
  npz:FILE               arrays x_train, y_train, x_test, y_test
"""
from __future__ import annotations

from pathlib import Path

from rwdeploy.data.augment import random_crop, random_hflip
from rwdeploy.data.builtin import digits, synthetic
from rwdeploy.data.dataset import ArrayDataset, BatchLoader, DataSplits, hold_out_validation, to_model_input
from rwdeploy.data.readers import DataError, cifar, image_folder, mnist, npz

BUILTIN = ("digits", "synthetic")
READERS = ("mnist", "cifar10", "cifar100", "folder", "npz")


def load_dataset(spec: str, image_shape: tuple[int, int, int], *, seed: int = 0) -> DataSplits:
    """Load the dataset named by `spec` (see module doc); `image_shape` is the model's (C, H, W)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not arg:
        return digits(seed=0)  # the split is fixed so that every run evaluates on the same images
    if kind == "synthetic" and not arg:
        return synthetic(tuple(image_shape), seed=seed)
    if kind in READERS:
        if not arg:
            raise DataError(f"--data {kind}: needs a path", hint=f"write --data {kind}:PATH")
        path = Path(arg).expanduser()
        if kind == "mnist":
            return mnist(path)
        if kind in ("cifar10", "cifar100"):
            return cifar(path, kind)
        if kind == "folder":
            return image_folder(path, tuple(image_shape), seed=seed)
        return npz(path)
    raise DataError(f"--data {spec}: unknown dataset",
                    hint=f"use one of {', '.join(BUILTIN)} or {', '.join(k + ':PATH' for k in READERS)}")


__all__ = ["ArrayDataset", "BatchLoader", "DataError", "DataSplits", "hold_out_validation", "load_dataset",
           "random_crop", "random_hflip", "to_model_input"]
