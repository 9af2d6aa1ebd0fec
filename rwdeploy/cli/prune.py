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
    "round_to": "round_to",
    "pretrain_epochs": "pretrain.epochs", "prune_epochs": "prune.epochs", "retrain_epochs": "retrain.epochs",
    "lr": "prune.lr", "retrain_lr": "retrain.lr", "batch_size": "batch_size", "seed": "seed",
    "device": "device", "debug_masks": "debug_masks", "rho": "admm.rho", "input_shape": "input_shape",
}


def _set(recipe: Any, dotted: str, value: Any) -> None:
    obj = recipe
    *head, last = dotted.split(".")
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _set_extensions(recipe: Any, *, adversarial: str | None, eps: float | None, steps: int | None,
                    bits: str | None, per_channel: bool | None, epochs: int | None) -> None:
    """Command-line adversarial/quantize options into the recipe's `extra` (over the recipe file)."""
    from rwdeploy.train.extensions import parse_extensions

    extra = dict(recipe.extra or {})
    adv = {k: v for k, v in {"method": adversarial, "eps": eps, "steps": steps}.items() if v is not None}
    if adv:
        if "adversarial" not in extra and adversarial is None:
            raise OptionError("--pgd-eps/--pgd-steps need --adversarial pgd")
        merged = {**(extra.get("adversarial") or {}), **adv}
        if eps is not None and "step" not in (extra.get("adversarial") or {}):
            merged["step"] = eps / 4  # the default ratio (2/255 for 8/255) unless the recipe sets a step
        extra["adversarial"] = merged
    quant = {k: v for k, v in {"bits": int(bits) if bits else None, "per_channel": per_channel,
                                "epochs": epochs}.items() if v is not None}
    if quant:
        if "quantize" not in extra and bits is None:
            raise OptionError("--per-channel/--quantize-epochs need --quantize 8|4")
        extra["quantize"] = {**(extra.get("quantize") or {}), **quant}
    recipe.extra = extra
    parse_extensions(extra)  # one clear error now, before any training


@click.command("prune")
@click.option("--model", help="Zoo name (e.g. lenet5, resnet20) or an rwdeploy checkpoint to start from.")
@click.option("--data", help="digits | synthetic | mnist:DIR | cifar10:DIR | cifar100:DIR | folder:DIR | npz:FILE")
@click.option("--scheme", help="irregular, filter, channel, column, kernel, pattern, blockRxC; combine with +, "
                               "per-scheme rates with ':' (e.g. filter:0.5+irregular:0.9).")
@click.option("--rate", type=float, help="Fraction of each scheme's groups to prune (0.9 = keep 10%).")
@click.option("--lambda", "lam", type=float, help="Penalty strength lambda (the reweighted method's one knob; default 1e-2, "
                                                   "1 when every scheme is filter: README 'Reweighted pruning results').")
@click.option("--method", type=click.Choice(["reweighted", "magnitude", "admm", "rw-admm"]),
              help="Pruning method (default reweighted; rw-admm: reweighted ADMM).")
@click.option("--recipe", type=click.Path(dir_okay=False), help="YAML recipe; options given here override it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (.pt) for `rwdeploy compile`.")
@click.option("--input-shape", "input_shape", help="Model input 1,C,H,W (default: the zoo's), e.g. 1,3,16,16.")
@click.option("--eps", type=float, help="epsilon in alpha_g = 1/(||W_g|| + eps) (default 1e-3).")
@click.option("--squared", is_flag=True, default=None, help="Use the squared group norm.")
@click.option("--global-rate", is_flag=True, default=None, help="Rank groups across layers instead of per layer.")
@click.option("--round-to", "round_to", type=int, help="Filter/channel schemes: keep a multiple of N channels per channel "
                                                        "group (kept count rounded up; default 1 = off).")
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
@click.option("--adversarial", type=click.Choice(["pgd"]), help="Adversarial training in every phase (PGD-Linf on [0, 1] pixels).")
@click.option("--pgd-eps", type=float, help="PGD budget in pixels (default 8/255); the step follows as eps/4 unless the recipe sets it.")
@click.option("--pgd-steps", type=int, help="PGD steps in training (default 10; evaluation adds a 50-step attack).")
@click.option("--quantize", type=click.Choice(["8", "4"]), help="Quantize weights to 8 or 4 bits after pruning (QAT with masks).")
@click.option("--per-channel", is_flag=True, default=None, help="Quantization scale per output channel instead of per layer.")
@click.option("--quantize-epochs", type=int, help="Quantization-aware retraining epochs (default 2).")
@click.pass_context
def command(ctx: click.Context, recipe: str | None, out: str, exclude: tuple[str, ...], include: tuple[str, ...],
            threads: int | None, resume: bool, log_path: str | None, quiet: bool, adversarial: str | None,
            pgd_eps: float | None, pgd_steps: int | None, quantize: str | None, per_channel: bool | None,
            quantize_epochs: int | None, **options: Any) -> None:
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
    if isinstance(base.input_shape, str):
        from rwdeploy.io import parse_input_shape

        base.input_shape = list(parse_input_shape(base.input_shape))
    if options.get("lr") is not None:
        base.pretrain.lr = options["lr"]
    if exclude:
        base.exclude = list(exclude)
    if include:
        base.include = list(include)
    if threads:
        torch.set_num_threads(threads)
    _set_extensions(base, adversarial=adversarial, eps=pgd_eps, steps=pgd_steps, bits=quantize,
                    per_channel=per_channel, epochs=quantize_epochs)
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
        click.echo(f"wrote {Path(out)}: {recipe_obj.method} {recipe_obj.scheme} rate {recipe_obj.rate}, "
                   f"prunable sparsity {result.sparsity:.3f}, {result.accuracy_text()}")
