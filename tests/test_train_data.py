"""Dataset readers on files written here, the built-ins, augmentations and error messages."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from rwdeploy.data import BatchLoader, DataError, load_dataset, random_crop, random_hflip


def test_digits_real_and_fitted_to_model_layouts():
    d = load_dataset("digits", (1, 28, 28))
    assert (len(d.train), len(d.test)) == (1257, 540) and d.num_classes == 10
    assert sorted(d.test.y.unique().tolist()) == list(range(10))
    (x, y), = [next(iter(BatchLoader(d, "test", (1, 3, 32, 32), 8, shuffle=False)))]
    assert x.shape == (8, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    x1, _ = next(iter(BatchLoader(d, "test", (1, 1, 28, 28), 8, shuffle=False)))
    assert x1.shape == (8, 1, 28, 28)


def test_loader_shards_cover_the_test_split_once():
    d = load_dataset("synthetic", (1, 8, 8))
    seen = []
    for rank in range(3):
        for _, y in BatchLoader(d, "test", (1, 1, 8, 8), 50, shuffle=False, rank=rank, world_size=3):
            seen.append(y[y >= 0])
    assert sum(len(s) for s in seen) == len(d.test)
    a = [y for _, y in BatchLoader(d, "train", (1, 1, 8, 8), 32, shuffle=True, seed=5)]
    b = [y for _, y in BatchLoader(d, "train", (1, 1, 8, 8), 32, shuffle=True, seed=5)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # seeded order


def _write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    imgs, lbls = rng.integers(0, 255, (6, 28, 28)), np.arange(6) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", imgs)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", lbls)
    d = load_dataset(f"mnist:{tmp_path}", (1, 28, 28))
    assert torch.equal(d.train.x[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    assert d.test.y.tolist() == lbls.tolist()
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte not found.*expected"):
        load_dataset(f"mnist:{tmp_path}", (1, 28, 28))


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 255, (4, 3072)).astype(np.uint8)
        data[name] = x
        with open(root / name, "wb") as f:
            pickle.dump({b"data": x, b"labels": [1, 2, 3, 4]}, f)
    d = load_dataset(f"cifar10:{tmp_path}", (3, 32, 32))
    assert len(d.train) == 20 and d.augment
    assert torch.equal(d.test.x, torch.from_numpy(data["test_batch"].reshape(4, 3, 32, 32)))
    with pytest.raises(DataError, match="no such folder.*data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}/missing", (3, 32, 32))


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ["train", "test"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"fine_labels": [0]}, f)
    with pytest.raises(DataError, match="refusing"):
        load_dataset(f"cifar100:{tmp_path}", (3, 32, 32))


def test_npz_and_folder(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", x_train=rng.random((5, 8, 8, 3)).astype(np.float32), y_train=np.arange(5) % 2,
             x_test=rng.random((3, 8, 8, 3)).astype(np.float32), y_test=np.array([0, 1, 1]))
    d = load_dataset(f"npz:{tmp_path / 'd.npz'}", (3, 8, 8))
    assert d.train.x.shape == (5, 3, 8, 8) and d.num_classes == 2
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="missing arrays"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}", (3, 8, 8))
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)).save(tmp_path / "imgs" / split / cls / "a.png")
    d = load_dataset(f"folder:{tmp_path / 'imgs'}", (3, 8, 8))
    assert d.train.x.shape == (2, 3, 8, 8) and d.notes["classes"] == ["cat", "dog"]
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet", (3, 8, 8))


def test_augmentations_against_direct_indexing():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        assert torch.equal(out[b], padded[b, :, dy[b]: dy[b] + 4, dx[b]: dx[b] + 4])
    flipped = random_hflip(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(flipped, x.flip(-1))
