"""A short pruning run on CUDA (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from rwdeploy.train import Recipe, run_pruning

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["reweighted", "admm"])
def test_prune_on_cuda_keeps_masks_and_matches_rate(tmp_path, method):
    r = Recipe(model="lenet5", data="digits", method=method, scheme="block1x4+kernel:0.3", rate=0.75,
               device="cuda", debug_masks=True)
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 1, 1, 1
    res = run_pruning(r, tmp_path / "m.pt")
    assert next(res.model.parameters()).is_cuda
    blocks = (~res.masks["fc1.weight"].cpu()).reshape(500, 200, 4).all(-1)
    assert int(blocks.sum()) == round(0.75 * 500 * 200)
    assert res.final_acc > 0.8
