"""Reweighted pruning training (Zhang et al., DAC 2021) and the baselines it is compared with.

    schemes.py      scheme names and strings ("filter:0.5+irregular"), the pattern library
    groups.py       GroupSet: groups of weights, their norms, masks from kept groups
    prune.py        prunable weights, exclusions, layer rules -> group sets; hard pruning
    regularizer.py  the reweighted penalty and its alphas
    methods.py      PruneMethod interface, registry; reweighted and magnitude
    admm.py         ADMM baseline (ECCV 2018)
    rw_admm.py      reweighted ADMM (reweighted proximal Z-step)
    adversarial.py  PGD adversarial training and robustness evaluation
    extensions.py   recipe `extra`: adversarial training, quantization-aware retraining
    masking.py      masked retraining
    trainer.py      the epoch loop with its hooks (perturb / loss / on_epoch_end)
    recipe.py       the run as dataclasses (YAML)
    dist.py         torchrun / DDP context
    pipeline.py     a whole run -> rwdeploy checkpoint with masks
"""
from __future__ import annotations

from rwdeploy.train import admm as _admm  # noqa: F401  (registers the admm method)
from rwdeploy.train import rw_admm as _rw_admm  # noqa: F401  (registers the rw-admm method)
from rwdeploy.train.groups import GroupSet, IndexGroups, PatternGroups, coupled_groups, tensor_groups
from rwdeploy.train.masking import Masker, MaskLeakError
from rwdeploy.train.methods import METHODS, PruneMethod, create_method, register_method
from rwdeploy.train.pipeline import PruneResult, PruneRun, run_pruning
from rwdeploy.train.prune import LayerRule, build_prune_targets, default_exclusions, hard_prune, sparsity
from rwdeploy.train.recipe import AdmmConfig, PenaltyConfig, PhaseConfig, Recipe
from rwdeploy.train.regularizer import ReweightedPenalty
from rwdeploy.train.schemes import SchemeSpec, parse_scheme, pattern_library
from rwdeploy.train.trainer import TrainHooks

__all__ = [
    "METHODS", "AdmmConfig", "GroupSet", "IndexGroups", "LayerRule", "MaskLeakError", "Masker",
    "PatternGroups", "PenaltyConfig", "PhaseConfig", "PruneMethod", "PruneResult", "PruneRun", "Recipe",
    "ReweightedPenalty", "SchemeSpec", "TrainHooks", "build_prune_targets", "coupled_groups", "create_method",
    "default_exclusions", "hard_prune", "parse_scheme", "pattern_library", "register_method", "run_pruning",
    "sparsity", "tensor_groups",
]
