"""The validation split: carved from the training data only, never overlapping the training or
the test images; a run with one evaluates the test split exactly once (or never, for tuning)."""
from __future__ import annotations

import pytest
import torch

from rwdeploy.data import ArrayDataset, DataSplits, hold_out_validation, load_dataset
from rwdeploy.errors import OptionError
from rwdeploy.train import Recipe, run_pruning
from rwdeploy.train import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids_dataset() -> DataSplits:
    """Every image holds its own id in every pixel: train ids 0..99, test ids 1000..1039.
    Labels: train class sizes 40/30/20/10 (classes 0..3), so stratification is visible."""
    ytr = torch.tensor([0] * 40 + [1] * 30 + [2] * 20 + [3] * 10)
    xtr = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1).expand(100, 1, 2, 2).clone()
    xte = torch.arange(1000, 1040, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 2, 2).clone()
    yte = torch.arange(40) % 4
    return DataSplits("ids", ArrayDataset(xtr, ytr), ArrayDataset(xte, yte), 4, (0.0,), (1.0,))


def _ids(ds: ArrayDataset) -> set[int]:
    return {int(v) for v in ds.x[:, 0, 0, 0]}


def test_validation_is_carved_from_train_only_and_overlaps_nothing():
    data = _ids_dataset()
    split = hold_out_validation(data, 0.2, seed=3)
    train, val, test = _ids(split.train), _ids(split.val), _ids(split.test)
    assert train | val == set(range(100))  # every training image lands in exactly one part
    assert not train & val and not val & test and not train & test
    assert split.test is data.test  # the test split is passed through untouched
    # stratified: round(0.2 * class size) per class, and the labels travel with the images
    counts = torch.bincount(split.val.y, minlength=4).tolist()
    assert counts == [8, 6, 4, 2]
    for x, y in zip(split.val.x[:, 0, 0, 0], split.val.y):
        assert int(y) == int(data.train.y[int(x)])
    notes = split.notes["validation"]
    assert set(notes["val_indices"]) == val and set(notes["train_indices"]) == train
    # fixed by the seed: the same split again, a different one for another seed
    assert _ids(hold_out_validation(data, 0.2, seed=3).val) == val
    assert _ids(hold_out_validation(data, 0.2, seed=4).val) != val


def test_digits_validation_split_sizes():
    d = load_dataset("digits", (1, 8, 8))
    split = hold_out_validation(d, 0.2)
    assert len(split.train) + len(split.val) == len(d.train) == 1257
    assert abs(len(split.val) - 0.2 * 1257) <= 10 and torch.equal(split.test.y, d.test.y)
    with pytest.raises(ValueError):
        hold_out_validation(split, 0.2)  # a second validation split would come out of the training part


def _count_evaluations(monkeypatch) -> list[str]:
    """Record which split each evaluation of a run reads (by identity of the dataset arrays)."""
    seen: list[str] = []
    real = pipeline.evaluate

    def spy(model, loader, dist):
        seen.append(loader.split_name)
        return real(model, loader, dist)

    real_init = pipeline.BatchLoader.__init__

    def init(self, data, split, *a, **kw):
        real_init(self, data, split, *a, **kw)
        self.split_name = split

    monkeypatch.setattr(pipeline, "evaluate", spy)
    monkeypatch.setattr(pipeline.BatchLoader, "__init__", init)
    return seen


def _recipe(**kw) -> Recipe:
    r = Recipe(model="lenet5", data="digits", method="reweighted", scheme="irregular", rate=0.8, device="cpu",
               val_fraction=0.2, **kw)
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 1, 1, 1
    return r


def test_a_run_with_validation_touches_the_test_split_once(tmp_path, monkeypatch):
    seen = _count_evaluations(monkeypatch)
    res = run_pruning(_recipe(), tmp_path / "m.pt")
    assert seen.count("test") == 1 and seen[-1] == "test"  # the final model, last
    assert seen.count("val") == 6  # dense start, 3 epochs, after hard prune, final model
    epochs = [r for r in res.log if r["phase"] in Recipe.PHASES]
    assert all("val_acc" in r and "test_acc" not in r for r in epochs)
    assert res.final_acc is not None and res.val_acc is not None
    assert "validation accuracy" in res.accuracy_text()
    # trained on the training part only: one epoch of 1,006 images in batches of 64
    assert epochs[0]["steps"] == -(-1006 // 64)


def test_a_tuning_run_never_touches_the_test_split(tmp_path, monkeypatch):
    seen = _count_evaluations(monkeypatch)
    res = run_pruning(_recipe(final_test=False), tmp_path / "m.pt")
    assert "test" not in seen and res.final_acc is None and res.val_acc is not None
    assert res.metadata["rwdeploy_prune"]["test_acc"] is None
    with pytest.raises(OptionError, match="validation split"):
        Recipe(final_test=False).validate()
