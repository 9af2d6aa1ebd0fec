"""A whole pruning run: build, (pre-train), prune phase, hard prune, masked retrain, checkpoint.

Rank 0 alone writes files: the output checkpoint, the per-epoch JSON-lines log and, after
every epoch, a resume state (`<out>.state.pt`) from which `--resume` continues at the next
epoch with the same model, optimiser, method variables and masks.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rwdeploy import models
from rwdeploy.data import BatchLoader, DataSplits, hold_out_validation, load_dataset
from rwdeploy.errors import ModelFileError, OptionError
from rwdeploy.io import Checkpoint, atomic_file, save_checkpoint
from rwdeploy.train.dist import DistContext, init_distributed
from rwdeploy.train.extensions import attach as attach_extensions
from rwdeploy.train.gradual import GradualPruning
from rwdeploy.train.groups import Masks
from rwdeploy.train.masking import Masker
from rwdeploy.train.methods import PruneMethod, create_method
from rwdeploy.train.prune import PruneTargets, build_prune_targets, hard_prune, kept_params, sparsity, total_params
from rwdeploy.train.recipe import PhaseConfig, Recipe
from rwdeploy.train.trainer import EpochRunner, TrainHooks, evaluate, make_optimizer

STATE_FORMAT = "rwdeploy-prune-state/1"
ProgressFactory = Callable[[str, int], Any]  # (description, total batches) -> object with .update(**fields), .close()


@dataclass
class PruneResult:
    model: nn.Module
    masks: Masks
    targets: PruneTargets
    log: list[dict[str, Any]]
    dense_acc: float | None  # of the starting model, on the evaluation split (validation if held out, else test)
    final_acc: float | None  # test accuracy of the final model; None when the recipe skips the test split
    sparsity: float
    wrote_checkpoint: bool
    checkpoint: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    val_acc: float | None = None  # final model on the validation split, when one is held out

    def accuracy_text(self) -> str:
        """One line for people: the final accuracy and the dense one it compares with."""
        split = "validation" if self.val_acc is not None else "test"
        dense = "n/a" if self.dense_acc is None else f"{self.dense_acc:.4f}"
        parts = [] if self.final_acc is None else [f"test accuracy {self.final_acc:.4f}"]
        if self.val_acc is not None:
            parts.append(f"validation accuracy {self.val_acc:.4f}")
        return f"{', '.join(parts)} (dense {dense} on {split})" if split == "validation" else f"{parts[0]} (dense {dense})"


def state_path(out: str | os.PathLike) -> Path:
    return Path(f"{out}.state.pt")


def default_log_path(out: str | os.PathLike) -> Path:
    return Path(f"{out}.log.jsonl")


def build_model(spec: str, num_classes: int) -> tuple[nn.Module, str, tuple[int, ...], dict[str, Any]]:
    """A zoo name (fresh weights) or a file with a zoo architecture (rwdeploy checkpoint)."""
    if Path(spec).suffix in (".pt", ".pth", ".ckpt") or Path(spec).is_file():
        from rwdeploy.io import load_model

        loaded = load_model(spec)
        if loaded.arch is None:
            raise ModelFileError(f"{spec}: pruning needs a zoo architecture", hint="pass an rwdeploy checkpoint or a zoo name")
        model = loaded.module
        return model, loaded.arch, tuple(loaded.input_shape), {"num_classes": _out_features(model)}
    model = models.create(spec, num_classes=num_classes)
    return model, spec, tuple(models.input_shape(spec)), {"num_classes": num_classes}


def _out_features(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else 0


def channel_analysis(model: nn.Module, example_input: torch.Tensor) -> Any:
    """The channel-dependency analysis compile uses, so filter/channel training zeroes
    exactly what compile can remove."""
    try:
        from rwdeploy.passes.channel_groups import analyze_channel_groups
        from rwdeploy.passes.trace import trace_model
    except ImportError:
        raise OptionError("schemes filter/channel need rwdeploy.passes.channel_groups, which this install lacks",
                          hint="use irregular/column/kernel/pattern/block, or update rwdeploy") from None
    traced = trace_model(model, example_input)
    return analyze_channel_groups(traced.gm, example_input)


def needs_analysis(recipe: Recipe) -> bool:
    return any(s.name in ("filter", "channel") for r in recipe.rules() for s in r.schemes)


class PruneRun:
    """One run of a recipe; `run()` executes the phases (resuming if asked)."""

    def __init__(self, recipe: Recipe, out: str | os.PathLike, *, resume: bool = False,
                 log_path: str | os.PathLike | None = None, hooks: TrainHooks | None = None,
                 progress: ProgressFactory | None = None, echo: Callable[[str], None] | None = None,
                 dist: DistContext | None = None, data: DataSplits | None = None) -> None:
        self.recipe = recipe.validate()
        self.out = Path(out)
        self.resume = resume
        self.log_path = Path(log_path) if log_path else default_log_path(out)
        self.hooks = hooks or TrainHooks()
        self.progress = progress
        self.echo = echo or (lambda s: None)
        self.dist = dist or init_distributed(recipe.device)
        self._data = data
        self.extensions = attach_extensions(self)  # recipe `extra`: adversarial training, quantization

    # ------------------------------------------------------------ set-up
    def _setup(self) -> None:
        r, dist = self.recipe, self.dist
        torch.manual_seed(r.seed)
        probe_classes = 10
        model, self.arch, self.input_shape, self.arch_kwargs = build_model(r.model, probe_classes)
        self.data = self._data or load_dataset(r.data, tuple(self.input_shape[1:]), seed=r.seed)
        if r.val_fraction > 0 and self.data.val is None:
            self.data = hold_out_validation(self.data, r.val_fraction)
        if _out_features(model) != self.data.num_classes:
            if Path(r.model).is_file():
                raise OptionError(f"--model {r.model}: has {_out_features(model)} outputs but {r.data} has "
                                  f"{self.data.num_classes} classes")
            torch.manual_seed(r.seed)
            model, self.arch, self.input_shape, self.arch_kwargs = build_model(r.model, self.data.num_classes)
        if r.input_shape is not None:
            self.input_shape = tuple(int(d) for d in r.input_shape)
        example = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(0))
        analysis = channel_analysis(model.eval(), example) if needs_analysis(r) else None
        self.targets = build_prune_targets(model, r.rules(), default_rate=r.rate, exclude=r.exclude,
                                           include=r.include, analysis=analysis, norm_scales=r.filter_norm_scales,
                                           round_to=r.round_to)
        if not self.targets.group_sets:
            why = self.targets.skipped[0] if self.targets.skipped else None
            detail = f" ({why.get('tensor', why.get('group'))}: {why['scheme']} {why['why']})" if why else ""
            raise OptionError(f"--scheme {r.scheme}: nothing to prune in {self.arch}{detail}",
                              hint="check the scheme (pattern needs 3x3 convolutions), the layer rules and --exclude/--include")
        self.model = model.to(dist.device)
        # every rank starts from rank 0's weights
        dist.broadcast_([p.data for p in self.model.parameters()] + [b for b in self.model.buffers()])
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.ddp_model: nn.Module = DDP(self.model, device_ids=ids)
        else:
            self.ddp_model = self.model
        per_rank = max(r.batch_size // dist.world_size, 1)
        self.train_loader = BatchLoader(self.data, "train", self.input_shape, per_rank, shuffle=True, seed=r.seed,
                                        rank=dist.rank, world_size=dist.world_size, device=dist.device)
        self.test_loader = BatchLoader(self.data, "test", self.input_shape, r.eval_batch_size, shuffle=False,
                                       rank=dist.rank, world_size=dist.world_size, device=dist.device)
        # Per-epoch and hard-prune evaluations: the validation split when one is held out (the
        # test split is then evaluated once, on the final model), else the test split.
        self.eval_split = "val" if r.val_fraction > 0 else "test"
        self.eval_loader = self.test_loader if self.eval_split == "test" else BatchLoader(
            self.data, "val", self.input_shape, r.eval_batch_size, shuffle=False,
            rank=dist.rank, world_size=dist.world_size, device=dist.device)
        self.method: PruneMethod = create_method(r.method, self.targets.group_sets, r, dist)
        self.masks: Masks = {}
        self.log: list[dict[str, Any]] = []
        self.dense_acc: float | None = None
        if self.extensions is not None:
            self.extensions.after_setup(self)

    # ------------------------------------------------------------ state
    def _save_state(self, phase: int, next_epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.dist.is_main:
            return
        state = {"format": STATE_FORMAT, "recipe": self.recipe.to_dict(), "phase": phase, "epoch": next_epoch,
                 "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "method": self.method.state_dict(),
                 "masks": {k: v.cpu() for k, v in self.masks.items()}, "dense_acc": self.dense_acc,
                 "log": json.dumps(self.log)}
        with atomic_file(state_path(self.out)) as tmp:
            torch.save(state, tmp)

    def _load_state(self) -> dict[str, Any] | None:
        path = state_path(self.out)
        if not path.is_file():
            raise OptionError(f"--resume: no saved state {path}", hint="run without --resume first (same --out)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise OptionError(f"--resume: {path} is not an rwdeploy prune state")
        if state["recipe"] != self.recipe.to_dict():
            diff = [k for k in state["recipe"] if state["recipe"][k] != self.recipe.to_dict().get(k)]
            raise OptionError(f"--resume: {path} was written by a different recipe (differs in {', '.join(diff)})",
                              hint="resume with the same options, or start afresh without --resume")
        self.model.load_state_dict(state["model"])
        self.masks = {k: v.to(self.dist.device) for k, v in state["masks"].items()}
        self.dense_acc = state["dense_acc"]
        self.log = json.loads(state["log"])
        return state

    def _write_log(self, record: dict[str, Any]) -> None:
        self.log.append(record)
        for fn in self.hooks.on_epoch_end:
            fn(record)
        if self.dist.is_main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------ phases
    def _prunable_sparsity(self) -> float:
        params = dict(self.model.named_parameters())
        return sparsity(params, self.targets.tensors)

    def _run_phase(self, index: int, name: str, cfg: PhaseConfig, start_epoch: int, state: dict | None) -> None:
        epoch_offset = sum(getattr(self.recipe, p).epochs for p in Recipe.PHASES[:index])
        optimizer = make_optimizer(self.model, cfg)
        if state is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        method = self.method if name == "prune" else None
        # retraining is masked; so is a gradual prune phase once its first event has pruned
        masked = name == "retrain" or (name == "prune" and bool(self.masks))
        masker = Masker(self.model, self.masks, debug=self.recipe.debug_masks) if masked else None
        if masker is not None:
            masker.apply_()
        pruner = None
        if name == "prune" and self.recipe.gradual > 0:
            pruner = GradualPruning(self.targets.group_sets, self.recipe.gradual,
                                    self.recipe.rate if self.recipe.global_rate else None)
            pruner.begin(len(self.train_loader), cfg.epochs)
        runner = EpochRunner(self.model, self.ddp_model, optimizer, self.train_loader, self.dist, self.hooks,
                             method=method, masker=masker, pruner=pruner, masks_changed=self._set_masks)
        if method is not None:
            method.begin(self.model, len(self.train_loader), cfg.epochs)
            if state is not None and state.get("phase") == index:
                method.load_state_dict(state["method"])
        for epoch in range(start_epoch, cfg.epochs):
            lr = cfg.lr_at(epoch)
            bar = self.progress(f"{name} {epoch + 1}/{cfg.epochs}", len(self.train_loader)) if self.progress else None
            on_batch = (lambda f: bar.update(loss=f["loss"], acc=f["acc"], sparsity=self._last_sparsity)) if bar else None
            stats = runner.run_epoch(epoch_offset + epoch, epoch, lr, on_batch)
            eval_loss, eval_acc = evaluate(self.ddp_model, self.eval_loader, self.dist)
            self._last_sparsity = self._prunable_sparsity()
            split = self.eval_split
            record = {"phase": name, "epoch": epoch + 1, "epochs": cfg.epochs, "lr": lr, **stats,
                      f"{split}_loss": eval_loss, f"{split}_acc": eval_acc, "sparsity": self._last_sparsity}
            if method is not None:
                record.update(method.log_fields())
            if bar is not None:
                bar.close(record)
            self._write_log(record)
            self._save_state(index, epoch + 1, optimizer)
            self.echo(f"{name} {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  pen {stats['penalty']:.4f}  "
                      f"acc {stats['train_acc']:.4f}  {split} {eval_acc:.4f}  sparsity {self._last_sparsity:.3f}")

    def _set_masks(self, masks: Masks) -> None:
        self.masks = masks

    def _hard_prune(self) -> None:
        """Prune to the full rate (keeping what gradual pruning already removed), then evaluate."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        global_rate = self.recipe.rate if self.recipe.global_rate else None
        masks = hard_prune(params, self.targets.group_sets, global_rate=global_rate, prior=self.masks or None)
        ordered = sorted(masks)
        self.dist.broadcast_([masks[n] for n in ordered])
        self.masks = masks
        Masker(self.model, masks).apply_()
        _, acc = evaluate(self.ddp_model, self.eval_loader, self.dist)
        self._write_log({"phase": "hard_prune", f"{self.eval_split}_acc": acc, "sparsity": self._prunable_sparsity(),
                         "layers": {n: float(1 - m.float().mean()) for n, m in masks.items()}})
        self.echo(f"hard prune: sparsity {self._prunable_sparsity():.3f}, {self.eval_split} accuracy {acc:.4f} "
                  "before retraining")

    def _hard_pruned(self) -> bool:
        return any(r.get("phase") == "hard_prune" for r in self.log)

    def run(self) -> PruneResult:
        self._setup()
        self._last_sparsity = 0.0
        state = self._load_state() if self.resume else None
        if state is None and self.dist.is_main and self.log_path.exists():
            self.log_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
        start_phase, start_epoch = (state["phase"], state["epoch"]) if state else (0, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        for index, name in enumerate(Recipe.PHASES):
            cfg: PhaseConfig = getattr(self.recipe, name)
            if index < start_phase:
                continue
            first = index == start_phase
            if name == "retrain" and not self._hard_pruned():
                self._hard_prune()
            if name == "prune" and self.dense_acc is None and (state is None or not first or start_epoch == 0):
                _, self.dense_acc = evaluate(self.ddp_model, self.eval_loader, self.dist)
            self._run_phase(index, name, cfg, start_epoch if first else 0, state if first else None)
        if not self._hard_pruned():  # no retrain phase
            self._hard_prune()
        extension_meta = self.extensions.after_retrain(self) if self.extensions is not None else {}
        Masker(self.model, self.masks).apply_()
        val_acc = evaluate(self.ddp_model, self.eval_loader, self.dist)[1] if self.eval_split == "val" else None
        # the one evaluation of the final model on the test split (skipped by tuning runs)
        final_acc = evaluate(self.ddp_model, self.test_loader, self.dist)[1] if self.recipe.final_test else None
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        sp = sparsity(params, self.targets.tensors)
        steps = sum(int(r.get("steps", 0)) for r in self.log if r.get("phase") in Recipe.PHASES)
        meta = {
            "rwdeploy_prune": {
                "method": self.recipe.method, "scheme": self.recipe.scheme, "rate": self.recipe.rate,
                "round_to": self.recipe.round_to,
                "lambda": self.recipe.penalty_lambda(), "data": self.recipe.data,
                f"dense_{self.eval_split}_acc": self.dense_acc, "test_acc": final_acc, "val_acc": val_acc,
                "prunable_sparsity": sp,
                "params_total": total_params(self.model), "params_nonzero": kept_params(self.model),
                "targets": self.targets.describe(), "recipe": self.recipe.to_dict(),
                "train_time_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
                "optimizer_steps": steps, "world_size": self.dist.world_size,
            }
        }
        meta.update(extension_meta)
        self._write_log({"phase": "final", "test_acc": final_acc, "val_acc": val_acc,
                         f"dense_{self.eval_split}_acc": self.dense_acc, "sparsity": sp})
        wrote = False
        if self.dist.is_main:
            ckpt = Checkpoint(self.arch, {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                              tuple(self.input_shape), self.arch_kwargs,
                              {k: v.cpu() for k, v in self.masks.items()}, meta)
            save_checkpoint(ckpt, self.out)
            wrote = True
        self.dist.barrier()
        return PruneResult(self.model, self.masks, self.targets, self.log, self.dense_acc, final_acc, sp,
                           wrote, self.out if wrote else None, meta, val_acc)


def run_pruning(recipe: Recipe, out: str | os.PathLike, **kw: Any) -> PruneResult:
    return PruneRun(recipe, out, **kw).run()
