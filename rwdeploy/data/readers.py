"""Readers for datasets on local disk. Nothing is ever downloaded: a missing file is an error
that says which files are expected where."""
from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from rwdeploy.data.dataset import ArrayDataset, DataSplits
from rwdeploy.errors import OptionError

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


class DataError(OptionError):
    """A dataset path is missing or its files are not in the expected format."""


def _existing_dir(path: Path, kind: str, expected: str) -> Path:
    if not path.is_dir():
        raise DataError(f"--data {kind}:{path}: no such folder", hint=f"expected {expected}")
    return path


# ---------------------------------------------------------------- MNIST IDX
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_EXPECTED = ("the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                   "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz) in that folder")


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (big-endian header: 0, 0, type code, number of dims, dim sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file", hint="use the original MNIST IDX files")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


def mnist(folder: Path) -> DataSplits:
    folder = _existing_dir(folder, "mnist", _MNIST_EXPECTED)
    splits = {}
    for split, (img_name, lbl_name) in MNIST_FILES.items():
        img, lbl = _find(folder, img_name), _find(folder, lbl_name)
        if img is None or lbl is None:
            raise DataError(f"--data mnist:{folder}: {img_name if img is None else lbl_name} not found",
                            hint=f"expected {_MNIST_EXPECTED}")
        x = torch.from_numpy(read_idx(img).copy()).unsqueeze(1)
        y = torch.from_numpy(read_idx(lbl).astype(np.int64))
        splits[split] = ArrayDataset(x, y)
    return DataSplits("mnist", splits["train"], splits["test"], 10, (0.1307,), (0.3081,))


# ---------------------------------------------------------------- CIFAR python batches
class _ArrayOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so loading runs no code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path}: not a CIFAR python batch ({err})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar(folder: Path, variant: str) -> DataSplits:
    sub = "cifar-10-batches-py" if variant == "cifar10" else "cifar-100-python"
    names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if variant == "cifar10" else (["train"], ["test"])
    expected = f"{', '.join(names[0] + names[1])} (the python version) in {folder} or {folder / sub}"
    folder = _existing_dir(folder, variant, expected)
    if not (folder / names[1][0]).is_file() and (folder / sub).is_dir():
        folder = folder / sub
    label_key = "labels" if variant == "cifar10" else "fine_labels"
    out = []
    for files in names:
        xs, ys = [], []
        for name in files:
            if not (folder / name).is_file():
                raise DataError(f"--data {variant}:{folder}: {name} not found", hint=f"expected {expected}")
            batch = _unpickle(folder / name)
            if "data" not in batch or label_key not in batch:
                raise DataError(f"{folder / name}: has no 'data'/'{label_key}' entries", hint=f"expected {expected}")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        out.append(ArrayDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))))
    classes = 10 if variant == "cifar10" else 100
    return DataSplits(variant, out[0], out[1], classes, CIFAR_MEAN[variant], CIFAR_STD[variant], augment=True)


# ---------------------------------------------------------------- image folder
_FOLDER_EXPECTED = "DIR/train/<class>/*.png and DIR/test/<class>/*.png (or DIR/<class>/* split 80/20)"


def image_folder(folder: Path, image_shape: tuple[int, int, int], seed: int = 0) -> DataSplits:
    folder = _existing_dir(folder, "folder", _FOLDER_EXPECTED)
    try:
        from PIL import Image
    except ImportError:
        raise DataError("--data folder: reading images needs Pillow, which is not installed",
                        hint="pip install pillow, or convert the images to an .npz file (--data npz:FILE)") from None
    c, h, w = image_shape
    mode = "L" if c == 1 else "RGB"

    def read_tree(root: Path, classes: list[str]) -> ArrayDataset:
        xs, ys = [], []
        for ci, cls in enumerate(classes):
            for f in sorted((root / cls).iterdir()) if (root / cls).is_dir() else []:
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    with Image.open(f) as im:
                        im = im.convert(mode).resize((w, h), Image.BILINEAR)
                        arr = np.asarray(im, dtype=np.uint8)
                    xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                    ys.append(ci)
        if not xs:
            raise DataError(f"--data folder:{root}: no images found", hint=f"expected {_FOLDER_EXPECTED}")
        return ArrayDataset(torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long))

    if (folder / "train").is_dir() and (folder / "test").is_dir():
        classes = sorted(d.name for d in (folder / "train").iterdir() if d.is_dir())
        train, test = read_tree(folder / "train", classes), read_tree(folder / "test", classes)
    else:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not classes:
            raise DataError(f"--data folder:{folder}: no class sub-folders", hint=f"expected {_FOLDER_EXPECTED}")
        full = read_tree(folder, classes)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        cut = int(round(0.8 * len(full)))
        train = ArrayDataset(full.x[perm[:cut]], full.y[perm[:cut]])
        test = ArrayDataset(full.x[perm[cut:]], full.y[perm[cut:]])
    mean, std = _channel_stats(train.x)
    return DataSplits("folder", train, test, len(classes), mean, std, notes={"classes": classes})


# ---------------------------------------------------------------- npz
_NPZ_EXPECTED = "arrays x_train, y_train, x_test, y_test (images NCHW, NHWC or NHW; uint8 or float in [0, 1])"


def _as_nchw(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{path}: {key} has shape {x.shape}", hint=f"expected {_NPZ_EXPECTED}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if t.dtype == torch.uint8 else t.float()


def npz(path: Path) -> DataSplits:
    if not path.is_file():
        raise DataError(f"--data npz:{path}: no such file", hint=f"expected an .npz with {_NPZ_EXPECTED}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable .npz ({err})", hint=f"expected {_NPZ_EXPECTED}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays.files]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}", hint=f"expected {_NPZ_EXPECTED}")
    train = ArrayDataset(_as_nchw(arrays["x_train"], path, "x_train"), torch.from_numpy(arrays["y_train"].astype(np.int64)))
    test = ArrayDataset(_as_nchw(arrays["x_test"], path, "x_test"), torch.from_numpy(arrays["y_test"].astype(np.int64)))
    classes = int(max(train.y.max(), test.y.max())) + 1
    mean, std = _channel_stats(train.x)
    return DataSplits(path.stem, train, test, classes, mean, std)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
