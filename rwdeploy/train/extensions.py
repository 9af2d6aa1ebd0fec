"""Adversarial training and quantization as options of a pruning run (recipe `extra`).

    extra:
      adversarial: {method: pgd, eps: 0.0314, step: 0.00784, steps: 10, eval_steps: 50, eval_samples: 512}
      quantize: {bits: 8, per_channel: false, epochs: 2, lr: 0.005}

`attach(run)` wires them into a `PruneRun`:

* adversarial: PGD examples replace the clean batches in every phase (pre-training, the prune
  phase, masked retraining and quantization-aware retraining); after every retraining epoch the
  model is evaluated for natural and PGD accuracy and the epoch with the best
  (natural + PGD) / 2 is kept (restored before quantization and the checkpoint); the final model
  is evaluated with PGD at the training strength and with `eval_steps` steps (gradient masking
  shows as a stronger attack doing no better).
* quantize: after retraining, the masked weights are fake-quantized (power-of-two scales, STE)
  and retrained for `epochs` with masks applied; the checkpoint then holds the dequantized
  weights (integers times scales) and `metadata["quantization"]`, which `compile` exports as
  QDQ ONNX.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rwdeploy.errors import OptionError
from rwdeploy.quant import convert, model_size, prepare_qat
from rwdeploy.quant.fixed_point import check_bits
from rwdeploy.train.adversarial import AdversarialTraining, PGDConfig, RobustSelection, evaluate_robustness


@dataclass
class AdversarialConfig:
    method: str = "pgd"
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    eval_steps: int = 50  # the stronger attack of the final evaluation (0: none)
    eval_samples: int | None = None  # test samples for the per-epoch robust evaluation (None: all)
    select: bool = True  # keep the retraining epoch with the best (natural + PGD) / 2

    def pgd(self) -> PGDConfig:
        return PGDConfig(float(self.eps), float(self.step), int(self.steps), bool(self.random_start))


@dataclass
class QuantizeConfig:
    bits: int = 8
    per_channel: bool = False
    epochs: int = 2  # quantization-aware retraining epochs (0: quantize after training, no retraining)
    lr: float = 0.005


def _parse(cls: type, value: Any, where: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OptionError(f"{where} must be a mapping", hint=f"e.g. {where}: {{{', '.join(f.name for f in dataclasses.fields(cls))}}}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in value if k not in names]
    if unknown:
        raise OptionError(f"{where}: unknown setting {unknown[0]!r}", hint=f"known: {', '.join(sorted(names))}")
    return cls(**value)


def parse_extensions(extra: dict[str, Any] | None) -> tuple[AdversarialConfig | None, QuantizeConfig | None]:
    """The adversarial and quantize settings of a recipe's `extra` (validated), or None each."""
    extra = extra or {}
    adv = _parse(AdversarialConfig, extra.get("adversarial"), "recipe extra.adversarial")
    quant = _parse(QuantizeConfig, extra.get("quantize"), "recipe extra.quantize")
    if adv is not None:
        if adv.method != "pgd":
            raise OptionError(f"--adversarial {adv.method}: unknown attack", hint="use pgd")
        adv.pgd()  # validates eps/step/steps
        if adv.eval_steps < 0 or (adv.eval_samples is not None and adv.eval_samples < 1):
            raise OptionError("recipe extra.adversarial: eval_steps must be >= 0 and eval_samples >= 1")
    if quant is not None:
        check_bits(quant.bits)
        if quant.epochs < 0 or float(quant.lr) <= 0:
            raise OptionError("recipe extra.quantize: epochs must be >= 0 and lr > 0")
    return adv, quant


class Extensions:
    """The hooks one run uses; `run` is the PruneRun they act on (set by `attach`)."""

    def __init__(self, adversarial: AdversarialConfig | None, quantize: QuantizeConfig | None) -> None:
        self.adversarial, self.quantize = adversarial, quantize
        self.run: Any = None
        self.selection = RobustSelection()

    # -------------------------------------------------------------- hooks
    def after_setup(self, run: Any) -> None:
        if self.adversarial is not None:
            data = run.data
            self._check_pixel_range(data)
            run.hooks.perturb = AdversarialTraining(self.adversarial.pgd(), data.mean, data.std, seed=run.recipe.seed)

    @staticmethod
    def _check_pixel_range(data: Any) -> None:
        x = data.train.x
        if x.dtype.is_floating_point and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
            raise OptionError(f"--adversarial: dataset {data.name} is not stored as pixels in [0, 1] "
                              f"(range {float(x.min()):.3g}..{float(x.max()):.3g})",
                              hint="the L-inf budget is defined on [0, 1] pixels; use image data")

    def robust(self, final: bool) -> Any:
        """Per-epoch: PGD at the training strength on `eval_samples` of the evaluation split
        (validation when held out, so the selection never sees the test split); final: also the
        stronger attack, on the whole test split."""
        cfg = self.adversarial
        loader = self.run.test_loader if final else self.run.eval_loader
        return evaluate_robustness(self.run.model, loader, mean=self.run.data.mean, std=self.run.data.std,
                                   cfg=cfg.pgd(), strong_steps=(cfg.eval_steps or None) if final else None,
                                   max_samples=None if final else cfg.eval_samples, seed=self.run.recipe.seed,
                                   all_reduce=self.run.dist.all_reduce_sum)

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        if self.adversarial is None or record.get("phase") != "retrain" or "epoch" not in record:
            return
        res = self.robust(final=False)
        record.update({"natural_acc": res.natural_acc, "pgd_acc": res.pgd_acc, "robust_score": res.score})
        if self.adversarial.select and self.selection.update(record["epoch"], res, self.run.model):
            record["selected"] = True

    def after_retrain(self, run: Any) -> dict[str, Any]:
        """Selection, then quantization-aware retraining, then the final robust evaluation; metadata."""
        meta: dict[str, Any] = {}
        if self.adversarial is not None and self.selection.best is not None:
            self.selection.restore(run.model)
            meta["robust_selection"] = {"criterion": RobustSelection.criterion, "epoch": self.selection.best_epoch,
                                        "result": self.selection.best.to_dict()}
            run.echo(f"robust selection: retraining epoch {self.selection.best_epoch} "
                     f"(natural {self.selection.best.natural_acc:.4f}, PGD {self.selection.best.pgd_acc:.4f})")
        if self.quantize is not None:
            meta.update(self._quantize(run))
        if self.adversarial is not None:
            res = self.robust(final=True)
            meta["adversarial"] = {"training": dataclasses.asdict(self.adversarial), "final": res.to_dict()}
            run.echo(f"robustness: natural {res.natural_acc:.4f}, PGD-{res.cfg.steps} {res.pgd_acc:.4f}, "
                     f"PGD-{res.strong_steps} {res.pgd_strong_acc if res.pgd_strong_acc is not None else float('nan'):.4f}")
        return meta

    def _quantize(self, run: Any) -> dict[str, Any]:
        from rwdeploy.train.masking import Masker
        from rwdeploy.train.recipe import PhaseConfig
        from rwdeploy.train.trainer import EpochRunner, evaluate, make_optimizer

        q = self.quantize
        prepare_qat(run.model, q.bits, per_channel=q.per_channel, masks=run.masks)
        cfg = PhaseConfig(epochs=q.epochs, lr=float(q.lr), schedule="cosine", weight_decay=run.recipe.retrain.weight_decay)
        if q.epochs:
            optimizer = make_optimizer(run.model, cfg)
            runner = EpochRunner(run.model, run.ddp_model, optimizer, run.train_loader, run.dist, run.hooks,
                                 masker=Masker(run.model, run.masks))
            offset = sum(getattr(run.recipe, p).epochs for p in run.recipe.PHASES)
            for epoch in range(q.epochs):
                stats = runner.run_epoch(offset + epoch, epoch, cfg.lr_at(epoch))
                _, acc = evaluate(run.ddp_model, run.eval_loader, run.dist)
                run._write_log({"phase": "quantize", "epoch": epoch + 1, "epochs": q.epochs, "bits": q.bits,
                                **stats, f"{run.eval_split}_acc": acc})
                run.echo(f"quantize {epoch + 1}/{q.epochs}  {q.bits}-bit  loss {stats['loss']:.4f}  "
                         f"{run.eval_split} {acc:.4f}")
        spec = convert(run.model)
        size = model_size(run.model, spec)
        return {"quantization": spec.to_dict(), "quantized_size": size, "quantize_epochs": q.epochs}


def attach(run: Any) -> Extensions | None:
    """Read `run.recipe.extra` and install the hooks on `run`; None when no extension is asked for."""
    adv, quant = parse_extensions(run.recipe.extra)
    if adv is None and quant is None:
        return None
    ext = Extensions(adv, quant)
    ext.run = run
    run.hooks.on_epoch_end.append(ext.on_epoch_end)
    return ext
