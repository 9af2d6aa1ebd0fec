"""The main job on a built-in default, run by `rwdeploy demo` (the README's first command)."""
from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from rwdeploy import models
from rwdeploy.console import make_console
from rwdeploy.inspection import inspect_model, render_table
from rwdeploy.errors import OptionError
from rwdeploy.io import Checkpoint, load_model
from rwdeploy.train.recipe import Recipe


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


DEMO_SCHEME = "filter:0.5+irregular:0.9"


def demo_recipe(epochs: tuple[int, int, int] = (4, 3, 3)) -> Recipe:
    """Reweighted pruning of LeNet-5 on the built-in digits: half of the channels of conv2 and
    fc1 (filter groups of the channel analysis, so compile can remove them), then 90% of those
    layers' weights in all (irregular); conv1 and the classifier stay dense. The penalty is the
    default one (bounded by the constraint, proximal steps, lambda 1e-2: README "Reweighted
    pruning results")."""
    r = Recipe(model="lenet5", data="digits", method="reweighted", scheme=DEMO_SCHEME, rate=0.9, device="cpu")
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = epochs
    return r


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionError(f"cannot create output folder {out}: {err.strerror}", hint="choose a writable --out") from None


def run_demo(out_dir: str | Path = "rwdeploy-demo", console: Console | None = None, *,
             epochs: tuple[int, int, int] = (4, 3, 3), measure: bool = True) -> Path:
    """The main job: prune LeNet-5 on digits (reweighted, filter + irregular), then compile it
    for `cpu` (remove the zeroed channels, verify, export, measure) and show the report."""
    from rwdeploy.compile import CompileOptions, compile_model
    from rwdeploy.report import REPORT_MD
    from rwdeploy.train import run_pruning
    from rwdeploy.train.progress import EpochBars

    console = console or make_console()
    out = Path(out_dir)
    _prepare_out(out)
    torch.set_num_threads(1)  # the fastest setting on a small or busy machine
    ckpt = out / "lenet5-pruned.pt"
    recipe = demo_recipe(epochs)
    console.print(f"[bold]rwdeploy demo[/] 1/2: reweighted pruning of LeNet-5 on digits "
                  f"(scheme {DEMO_SCHEME}, lambda {recipe.penalty_lambda()}, epochs {'+'.join(map(str, epochs))})")
    err = make_console(stderr=True)
    bars = EpochBars(err) if err.is_terminal else None
    echo = None if bars is not None else (lambda s: err.print(s, highlight=False))
    try:
        result = run_pruning(recipe, ckpt, progress=bars, echo=echo)
    finally:
        if bars is not None:
            bars.stop()
    console.print(f"wrote {ckpt}: test accuracy {result.final_acc:.2%} (dense {result.dense_acc:.2%}), "
                  f"{result.sparsity:.0%} of conv2/fc1 weights pruned")
    render_table(inspect_model(load_model(ckpt)), console)

    console.print("[bold]rwdeploy demo[/] 2/2: compile for cpu (remove zero channels, verify, export, measure)")
    compiled = compile_model(load_model(ckpt), CompileOptions(out=out / "lenet5-cpu", target="cpu", measure=measure))
    from rwdeploy.cli.compile import summary_table

    console.print(summary_table(compiled.report, compiled.out))
    console.print(f"report: {compiled.out / REPORT_MD}")
    return compiled.out
