"""In-memory image classification data and a batch iterator that shards across ranks.

Every dataset rwdeploy trains on is small enough to hold in memory (digits, MNIST, CIFAR):
images as a tensor `x` [N, C, H, W] (uint8 0..255 or float), labels `y` [N] int64.
Batches are converted, resized to the model's input and normalised on the fly, so one
stored copy serves every model layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from rwdeploy.data.augment import random_crop, random_hflip


@dataclass
class ArrayDataset:
    x: torch.Tensor  # [N, C, H, W], uint8 (0..255) or float (already in [0, 1])
    y: torch.Tensor  # [N] int64

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"bad dataset arrays: x {tuple(self.x.shape)}, y {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataSplits:
    """A train/test pair (and an optional validation split carved from train) plus what a
    model needs to consume it."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    # Per-channel statistics of the stored images in [0, 1] scale, used to normalise.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False  # random crop (padding 4) + horizontal flip, for CIFAR-style images
    notes: dict = field(default_factory=dict)
    val: ArrayDataset | None = None  # held out from the training data (see hold_out_validation)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]


def hold_out_validation(data: DataSplits, fraction: float, *, seed: int = 0) -> DataSplits:
    """`data` with a stratified `fraction` of its training images moved into a validation split.

    Every class gives round(fraction * its count) images (at least one when it has two or more),
    drawn with a generator fixed by `seed`, so every run of a study sees the same split. The test
    split is passed through untouched; `notes["validation"]` lists the training-array indices of
    both parts so that the split can be audited.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction {fraction} is outside (0, 1)")
    if data.val is not None:
        raise ValueError(f"dataset {data.name} already has a validation split")
    y = data.train.y
    g = torch.Generator().manual_seed(int(seed))
    val_parts = []
    for cls in torch.unique(y).tolist():
        members = (y == cls).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        n_val = int(round(fraction * len(members)))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val_parts.append(members[:n_val])
    val_idx = torch.sort(torch.cat(val_parts)).values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val_idx] = False
    train_idx = keep.nonzero().squeeze(1)
    notes = dict(data.notes, validation={"fraction": fraction, "seed": int(seed),
                                         "train_indices": train_idx.tolist(), "val_indices": val_idx.tolist()})
    return DataSplits(data.name, ArrayDataset(data.train.x[train_idx], y[train_idx]), data.test, data.num_classes,
                      data.mean, data.std, augment=data.augment, notes=notes,
                      val=ArrayDataset(data.train.x[val_idx], y[val_idx]))


def to_model_input(x: torch.Tensor, input_shape: tuple[int, ...], mean: tuple[float, ...],
                   std: tuple[float, ...]) -> torch.Tensor:
    """Convert stored images to float, normalise, then fit channels and size to `input_shape`."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    c, h, w = input_shape[-3:]
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot map {x.shape[1]}-channel images to a {c}-channel model")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.contiguous()


class BatchLoader:
    """Shuffled mini-batches of one rank's shard; the order is a function of (seed, epoch).

    Every rank gets the same number of batches (the permutation is cut to a multiple of the
    world size), which DistributedDataParallel needs.
    """

    def __init__(self, data: DataSplits, split: str, input_shape: tuple[int, ...], batch_size: int,
                 *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", augment: bool | None = None) -> None:
        self.ds: ArrayDataset = getattr(data, split)
        self.data = data
        self.input_shape = tuple(input_shape)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.augment = data.augment if augment is None else augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        n = len(self.ds)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.shuffle:
                order = order[: n - n % self.world_size]
            else:  # evaluation keeps every sample: pad ranks with -1, ignored when counting
                pad = (-n) % self.world_size
                order = torch.cat([order, torch.full((pad,), -1, dtype=torch.long)])
            order = order[self.rank:: self.world_size]
        return order

    def __len__(self) -> int:
        return (len(self._indices()) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank)
        for start in range(0, len(order), self.batch_size):
            idx = order[start: start + self.batch_size]
            valid = idx >= 0
            idx = idx.clamp_min(0)
            x, y = self.ds.x[idx], self.ds.y[idx].clone()
            y[~valid] = -1  # padding samples of an evaluation shard; cross-entropy/accuracy skip -1
            if self.augment and self.shuffle:
                x = random_hflip(random_crop(x, 4, g), g)
            x = to_model_input(x.to(self.device), self.input_shape, self.data.mean, self.data.std)
            yield x, y.to(self.device)
