"""Run by tests/test_train_ddp.py under torchrun: one short pruning run per rank, each rank
saving what it holds (weights, masks, alphas) for the test to compare."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from rwdeploy.train import Recipe, run_pruning
from rwdeploy.train.dist import init_distributed

if __name__ == "__main__":
    out_dir, method = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    recipe = Recipe(model="lenet5", data="digits", method=method, scheme="irregular", rate=0.7, device="cpu",
                    batch_size=64)
    recipe.penalty.lam = 1e-5
    recipe.pretrain.epochs, recipe.prune.epochs, recipe.retrain.epochs = 0, 1, 1
    dist = init_distributed("cpu")
    result = run_pruning(recipe, out_dir / "model.pt", dist=dist)
    torch.save({"state": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
                "masks": result.masks, "wrote": result.wrote_checkpoint, "world": dist.world_size,
                "acc": result.final_acc},
               out_dir / f"rank{dist.rank}.pt")
    dist.close()
