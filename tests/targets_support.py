"""A tiny residual CNN for the target tests: conv+BN+ReLU, a residual block, pooling, Linear."""
from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        x = torch.relu(self.down(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def tiny_model(seed: int = 0, width: int = 8) -> nn.Module:
    """TinyResNet with non-trivial BatchNorm statistics (so folding them is really tested)."""
    torch.manual_seed(seed)
    model = TinyResNet(width)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def tiny_input(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def elf_machine_field(path) -> int:
    """e_machine of an ELF file (0xB7 aarch64, 0x3E x86-64), read from the header directly."""
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def cpu_build_checked(model: nn.Module, x: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5):
    """rwdeploy's cpu TVM build of `model` at `x`, its output checked against torch's."""
    import numpy as np

    from rwdeploy.runtime import tvm_build

    art = tvm_build.build(model, x, "cpu", threads=1)
    _, got = tvm_build.bind_local(art, x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=rtol, atol=atol)
    return art
