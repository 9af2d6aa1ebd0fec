"""Data that is always present: scikit-learn's bundled handwritten digits, and synthetic data."""
from __future__ import annotations

import torch

from rwdeploy.data.dataset import ArrayDataset, DataSplits

DIGITS_TEST_FRACTION = 0.3


def digits(seed: int = 0) -> DataSplits:
    """The 1,797 8x8 handwritten digits (UCI, bundled with scikit-learn): real data, no download.

    Stored at their native 8x8, one channel, values scaled to [0, 1]; batches are up-sampled
    (bilinear) to the model's input, e.g. 1x28x28 for LeNet-5 or 3x32x32 for CIFAR-layout
    networks. The split is stratified and fixed by `seed`: 1,257 train / 540 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.from_numpy(bunch.target).long()
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_FRACTION, random_state=seed, stratify=y.numpy())
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    mean, std = float(x[tr].mean()), float(x[tr].std())
    return DataSplits("digits", ArrayDataset(x[tr], y[tr]), ArrayDataset(x[te], y[te]), 10,
                      (mean,), (std,), augment=False,
                      notes={"source": "sklearn.datasets.load_digits", "native_shape": [1, 8, 8]})


def synthetic(image_shape: tuple[int, int, int], num_classes: int = 10, n_train: int = 512,
              n_test: int = 256, seed: int = 0) -> DataSplits:
    """Class-conditional Gaussian images: each class has a smooth random template plus noise.

    Learnable but not trivial; meant for smoke tests and timing, never for accuracy claims.
    """
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape
    coarse = torch.rand(num_classes, c, max(h // 4, 1), max(w // 4, 1), generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def draw(n: int) -> ArrayDataset:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = templates[y] + 0.35 * torch.randn(n, c, h, w, generator=g)
        return ArrayDataset(x.clamp(0, 1), y)

    return DataSplits("synthetic", draw(n_train), draw(n_test), num_classes, (0.5,) * c, (0.3,) * c)
