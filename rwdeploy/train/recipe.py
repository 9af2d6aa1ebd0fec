"""A pruning run described as data: parsed from YAML (`--recipe`) or built from CLI flags.

    model: resnet20
    data: cifar10:/data/cifar
    method: reweighted          # reweighted | magnitude | admm (or a registered extension)
    scheme: filter              # default for every prunable layer
    rate: 0.5
    global_rate: false
    round_to: 1                 # filter/channel: keep a multiple of N channels per channel group
    layers:                     # first matching rule wins; names or module names, globs allowed
      - {match: "layer3.*", scheme: "filter:0.6+irregular:0.8"}
    exclude: null               # null: first conv + classifier; [] prunes everything
    include: []                 # force-include excluded layers
    penalty: {lam: 1e-2, eps: 1e-3, squared: false, milestones: null, updates: 5, bounded: true, bound_tol: 0.01,
              proximal: true}        # lam: omit for the default (1e-2; 1 when every scheme is filter)
    admm: {rho: 1e-3, rho_factor: 1.5, rho_max: 1.0, update_every: 1}
    pretrain: {epochs: 0}
    prune:   {epochs: 10, lr: 0.05, schedule: cosine}
    retrain: {epochs: 10, lr: 0.01, schedule: cosine}
    gradual: 0                  # hard-pruning events inside the prune phase (0: once, after it)
    val_fraction: 0.0           # hold out this much of train for per-epoch evaluation

Unknown keys are errors (a typo must not silently fall back to a default). Extensions keep
their settings under `extra`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rwdeploy.errors import OptionError
from rwdeploy.train.prune import LayerRule
from rwdeploy.train.schemes import COUPLED_SCHEMES, check_rate, check_round_to, parse_scheme

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class PhaseConfig:
    epochs: int = 0
    lr: float = 0.05
    schedule: str = "cosine"  # cosine | step | constant (per epoch)
    milestones: list[int] = field(default_factory=list)  # step schedule: epochs where lr *= gamma
    gamma: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def lr_at(self, epoch: int) -> float:
        import math

        if self.schedule == "constant" or self.epochs <= 1:
            return self.lr
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))


# lambda when the recipe gives none, per method: the reweighted default comes from the study in
# README "Reweighted pruning results" (chosen on validation); rw-admm keeps its own scale
# (lambda / rho is its soft threshold).
DEFAULT_LAMBDA = {"reweighted": 1e-2, "rw-admm": 1e-4}
# ... except a reweighted run whose every scheme is `filter`: a proximal step shrinks a group by
# about lr * lambda / ||W_g||^2, and a filter group (producer slices + BatchNorm scale) has a
# squared norm ~1e3 times a single weight's, so the study chose lambda = 1 for ResNet-20 filter
# pruning (1e-2 there barely moves the ranking: the run is close to magnitude pruning).
FILTER_LAMBDA = {"reweighted": 1.0}


@dataclass
class PenaltyConfig:
    lam: float | None = None  # None: the default of the method and schemes (see lam_for)
    eps: float = 1e-3
    squared: bool = False
    # Epochs (within the prune phase) at which alpha is re-estimated; None: `updates` evenly
    # spaced points over the phase (default 5: every fifth), counted in steps.
    milestones: list[int] | None = None
    updates: int = 5
    # Bound the penalty by the designated constraint: only the groups the rate removes are
    # pushed, until each is below bound_tol x the mean kept-group norm (see regularizer.py).
    bounded: bool = True
    bound_tol: float = 1e-2
    # Minimise loss + penalty by a proximal step after each optimiser step (exact zeros)
    # instead of adding the penalty's subgradient to the loss.
    proximal: bool = True

    def lam_for(self, method: str, schemes: list[str] | None = None) -> float:
        """The lambda a run of `method` with these scheme names uses: the recipe's, else the
        method's default (FILTER_LAMBDA when every scheme is `filter`)."""
        if self.lam is not None:
            return float(self.lam)
        if schemes and all(name == "filter" for name in schemes) and method in FILTER_LAMBDA:
            return FILTER_LAMBDA[method]
        return DEFAULT_LAMBDA.get(method, DEFAULT_LAMBDA["reweighted"])


@dataclass
class AdmmConfig:
    rho: float = 1e-3  # initial rho
    rho_factor: float = 1.5  # rho *= factor at every Z/U update ...
    rho_max: float = 1.0  # ... up to this
    update_every: int = 1  # epochs between Z/U updates


@dataclass
class Recipe:
    model: str = "lenet5"
    data: str = "digits"
    input_shape: list[int] | None = None  # [1, C, H, W]; None: the zoo's default
    method: str = "reweighted"
    scheme: str = "irregular"
    rate: float = 0.5
    global_rate: bool = False
    # Filter/channel schemes: hard pruning keeps a multiple of this many channels in every
    # channel group (the kept count rounded up; 1 = off), so the trained widths deploy aligned.
    round_to: int = 1
    layers: list[dict[str, str]] = field(default_factory=list)
    exclude: list[str] | None = None
    include: list[str] = field(default_factory=list)
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    pretrain: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=0))
    prune: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=10))
    retrain: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=10, lr=0.01))
    # Hard pruning inside the prune phase: 0 = once, after it; N = N events spread over the
    # phase, the rate rising as rate * (1 - (1 - k/N)^3), the last one at the full rate.
    gradual: int = 0
    # Filter groups include the normalisation (BatchNorm) scales after their convolutions: a
    # conv before BN is scale-invariant, so only the scale can switch a channel off.
    filter_norm_scales: bool = True
    # Fraction of the training data held out as a validation split (stratified, fixed): the
    # per-epoch and hard-prune evaluations then use it, and the test split is evaluated only
    # once, on the final model (never, with final_test false: tuning runs).
    val_fraction: float = 0.0
    final_test: bool = True
    batch_size: int = 64
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    debug_masks: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    PHASES = ("pretrain", "prune", "retrain")

    def rules(self) -> list[LayerRule]:
        """Layer rules in priority order; the run's scheme applies to every remaining layer."""
        out = []
        for i, r in enumerate(self.layers):
            if not isinstance(r, dict) or "match" not in r or "scheme" not in r:
                raise OptionError(f"recipe layers[{i}]: needs 'match' and 'scheme'", hint='e.g. {match: "conv2", scheme: "filter:0.5"}')
            out.append(LayerRule.parse(str(r["match"]), str(r["scheme"])))
        out.append(LayerRule("*", parse_scheme(self.scheme)))
        return out

    def penalty_lambda(self) -> float:
        """The lambda this run uses (the recipe's, else the default for its method and schemes)."""
        return self.penalty.lam_for(self.method, [spec.name for rule in self.rules() for spec in rule.schemes])

    def validate(self) -> "Recipe":
        check_rate(self.rate, "--rate")
        rules = self.rules()
        check_round_to(self.round_to)
        if self.round_to > 1 and not any(s.name in COUPLED_SCHEMES for r in rules for s in r.schemes):
            raise OptionError(f"--round-to {self.round_to}: needs a filter or channel scheme (--scheme {self.scheme} has "
                              "no channel groups to round)", hint="use --scheme filter|channel (e.g. filter:0.5+irregular:0.9), "
                              "or drop --round-to")
        for name in self.PHASES:
            ph: PhaseConfig = getattr(self, name)
            if ph.epochs < 0 or ph.lr <= 0:
                raise OptionError(f"recipe {name}: epochs must be >= 0 and lr > 0")
            if ph.schedule not in SCHEDULES:
                raise OptionError(f"recipe {name}.schedule {ph.schedule!r}", hint=f"use one of {', '.join(SCHEDULES)}")
            if ph.optimizer not in OPTIMIZERS:
                raise OptionError(f"recipe {name}.optimizer {ph.optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
        if self.penalty_lambda() < 0 or self.penalty.eps <= 0 or self.penalty.updates < 1 or self.penalty.bound_tol < 0:
            raise OptionError("recipe penalty: lam must be >= 0, eps > 0, updates >= 1, bound_tol >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OptionError(f"recipe val_fraction {self.val_fraction}: must be in [0, 1)", hint="e.g. 0.2")
        if not self.final_test and self.val_fraction == 0.0:
            raise OptionError("recipe final_test false needs a validation split (val_fraction > 0)",
                              hint="a run must be evaluated on some held-out data")
        if self.gradual < 0:
            raise OptionError(f"recipe gradual {self.gradual}: must be >= 0 (0 = one hard prune after the prune phase)")
        if self.input_shape is not None and (len(self.input_shape) != 4 or min(self.input_shape) < 1):
            raise OptionError(f"--input-shape {self.input_shape}: need 4 positive sizes", hint="e.g. 1,3,16,16")
        if self.batch_size < 1:
            raise OptionError("--batch-size must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        return _build(cls, data, where).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise OptionError(f"--recipe {path}: no such file", hint="pass a YAML recipe (see README, Reweighted pruning)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise OptionError(f"--recipe {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise OptionError(f"--recipe {path}: must be a mapping of settings")
        return cls.from_dict(data, where=str(path))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise OptionError(f"{where}: unknown setting {key!r}", hint=f"known: {', '.join(fields)}")
        ftype = fields[key].type
        sub = {"PhaseConfig": PhaseConfig, "PenaltyConfig": PenaltyConfig, "AdmmConfig": AdmmConfig}.get(str(ftype))
        if sub is not None:
            if not isinstance(value, dict):
                raise OptionError(f"{where}: {key} must be a mapping")
            value = _build(sub, value, f"{where}: {key}")
        elif key in ("lam", "eps", "lr", "rate", "rho", "rho_factor", "rho_max", "gamma", "momentum", "weight_decay",
                     "bound_tol", "val_fraction"):
            try:
                value = float(value)  # YAML reads 1e-4 as a string
            except (TypeError, ValueError):
                raise OptionError(f"{where}: {key} must be a number, got {value!r}") from None
        kwargs[key] = value
    return cls(**kwargs)
