"""The main job on a built-in default, run by `rwdeploy demo` (the README's first command)."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from rwdeploy import models
from rwdeploy.console import make_console
from rwdeploy.inspection import inspect_model, render_table
from rwdeploy.io import Checkpoint, load_model, save_checkpoint


def example_pruned_lenet(seed: int = 0) -> Checkpoint:
    """LeNet-5 with seeded weights and half the filters of conv2 and half the rows of fc1 zeroed
    (the smallest by L2 norm), as a filter-pruning run would leave it."""
    torch.manual_seed(seed)
    net = models.create("lenet5")
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in ("conv2", "fc1"):
            w = getattr(net, name).weight
            norms = w.reshape(w.shape[0], -1).norm(dim=1)
            pruned = norms.argsort()[: w.shape[0] // 2]
            keep = torch.ones_like(w, dtype=torch.bool)
            keep[pruned] = False
            w.mul_(keep)
            masks[f"{name}.weight"] = keep
    return Checkpoint("lenet5", net.state_dict(), models.input_shape("lenet5"), masks=masks,
                      metadata={"origin": "rwdeploy demo: magnitude-zeroed example"})


def run_demo(out_dir: str | Path = "rwdeploy-demo", console: Console | None = None) -> Path:
    console = console or make_console()
    out = Path(out_dir)
    path = out / "example-lenet5.pt"
    save_checkpoint(example_pruned_lenet(), path)
    console.print(f"[bold]rwdeploy demo[/]: wrote {path} (LeNet-5, half of conv2/fc1 zeroed)")
    render_table(inspect_model(load_model(path)), console)
    return path
