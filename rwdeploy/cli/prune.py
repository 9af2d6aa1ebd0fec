"""`rwdeploy prune`: reweighted pruning training (or a baseline) -> an rwdeploy checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from rwdeploy.errors import OptionError

# CLI option -> where it lands in the recipe (dotted path).
_RECIPE_FIELDS = {
    "model": "model", "data": "data", "method": "method", "scheme": "scheme", "rate": "rate",
    "lam": "penalty.lam", "eps": "penalty.eps", "squared": "penalty.squared", "global_rate": "global_rate",
    "pretrain_epochs": "pretrain.epochs", "prune_epochs": "prune.epochs", "retrain_epochs": "retrain.epochs",
    "lr": "prune.lr", "retrain_lr": "retrain.lr", "batch_size": "batch_size", "seed": "seed",
    "device": "device", "debug_masks": "debug_masks", "rho": "admm.rho",
}


def _set(recipe: Any, dotted: str, value: Any) -> None:
    obj = recipe
    *head, last = dotted.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


@click.command("prune")
@click.option("--model", help="Zoo name (e.g. lenet5, resnet20) or an rwdeploy checkpoint to start from.")
@click.option("--data", help="digits | synthetic | mnist:DIR | cifar10:DIR | cifar100:DIR | folder:DIR | npz:FILE")
@click.option("--scheme", help="irregular, filter, channel, column, kernel, pattern, blockRxC; combine with +, "
                               "per-scheme rates with ':' (e.g. filter:0.5+irregular:0.9).")
@click.option("--rate", type=float, help="Fraction of each scheme's groups to prune (0.9 = keep 10%).")
@click.option("--lambda", "lam", type=float, help="Penalty strength lambda (the reweighted method's one knob).")
@click.option("--method", type=click.Choice(["reweighted", "magnitude", "admm"]), help="Pruning method (default reweighted).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe; options given here override it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt) for `rwdeploy compile`.")
@click.option("--eps", type=float, help="epsilon in alpha_g = 1/(||W_g|| + eps) (default 1e-3).")
@click.option("--squared", is_flag=True, default=None, help="Use the squared group norm.")
@click.option("--global-rate", is_flag=True, default=None, help="Rank groups across layers instead of per layer.")
@click.option("--exclude", multiple=True, help="Layers to leave dense (glob; repeatable). Default: first conv + classifier.")
@click.option("--include", multiple=True, help="Prune these normally excluded layers (glob; repeatable).")
@click.option("--pretrain-epochs", type=int, help="Dense training epochs before pruning.")
@click.option("--prune-epochs", type=int, help="Epochs of the prune phase (penalty / ADMM / plain).")
@click.option("--retrain-epochs", type=int, help="Masked retraining epochs after hard pruning.")
@click.option("--lr", type=float, help="Learning rate of pre-training and the prune phase.")
@click.option("--retrain-lr", type=float, help="Learning rate of masked retraining.")
@click.option("--rho", type=float, help="ADMM: initial rho.")
@click.option("--batch-size", type=int, help="Global batch size (split across torchrun ranks).")
@click.option("--seed", type=int, help="Seed for initialisation, data order and augmentation.")
@click.option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--threads", type=int, help="CPU threads for torch (1 is fastest on a busy machine).")
@click.option("--resume", is_flag=True, help="Continue from OUT.state.pt, written after every epoch.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="Per-epoch JSON lines (default OUT.log.jsonl).")
@click.option("--debug-masks", is_flag=True, default=None, help="Check after every retraining step that pruned weights stay exactly zero.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def command(ctx: click.Context, recipe: str | None, out: str, exclude: tuple[str, ...], include: tuple[str, ...],
            threads: int | None, resume: bool, log_path: str | None, quiet: bool, **options: Any) -> None:
    """Prune a network by reweighted group penalties, hard pruning and masked retraining."""
    import torch

    from rwdeploy.train import Recipe, run_pruning
    from rwdeploy.train.dist import init_distributed

    base = Recipe.from_yaml(recipe) if recipe else Recipe()
    if not recipe and not options.get("model"):
        raise OptionError("--model is required (or give a --recipe)", hint="e.g. --model lenet5 --data digits")
    for key, value in options.items():
        if value is None:
            continue
        if recipe and ctx.get_parameter_source(key) != ParameterSource.COMMANDLINE:
            continue
        _set(base, _RECIPE_FIELDS[key], value)
    if options.get("lr") is not None:
        base.pretrain.lr = options["lr"]
    if exclude:
        base.exclude = list(exclude)
    if include:
        base.include = list(include)
    if threads:
        torch.set_num_threads(threads)
    recipe_obj = base.validate()

    dist = init_distributed(recipe_obj.device)
    show = not quiet and dist.is_main
    bars = None
    if show:
        from rich.console import Console

        from rwdeploy.train.progress import EpochBars

        console = Console(stderr=True)
        if console.is_terminal:
            bars = EpochBars(console)
    echo = (lambda s: click.echo(s, err=True)) if show and bars is None else None
    try:
        result = run_pruning(recipe_obj, out, resume=resume, log_path=log_path, progress=bars, echo=echo, dist=dist)
    finally:
        if bars is not None:
            bars.stop()
        dist.close()
    if dist.is_main and not quiet:
        dense = "n/a" if result.dense_acc is None else f"{result.dense_acc:.4f}"
        click.echo(f"wrote {Path(out)}: {recipe_obj.method} {recipe_obj.scheme} rate {recipe_obj.rate}, "
                   f"prunable sparsity {result.sparsity:.3f}, test accuracy {result.final_acc:.4f} (dense {dense})")
