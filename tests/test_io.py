"""Model files in and out: every accepted kind, and every kind of bad file."""
from __future__ import annotations

import os

import pytest
import torch

from rwdeploy import io, models
from rwdeploy.errors import ModelFileError, OptionError


def _same_function(a: torch.nn.Module, b: torch.nn.Module, shape) -> bool:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return models.create("resnet20", num_classes=10)


def test_checkpoint_round_trip_with_masks(tmp_path, net):
    masks = {"fc.weight": torch.rand(10, 64) > 0.5}
    io.save_checkpoint(io.Checkpoint("resnet20", net.state_dict(), (1, 3, 32, 32), masks=masks,
                                     metadata={"rate": 0.5}), tmp_path / "c.pt")
    loaded = io.load_model(tmp_path / "c.pt")
    assert loaded.source == "checkpoint" and loaded.arch == "resnet20"
    assert loaded.input_shape == (1, 3, 32, 32)
    assert torch.equal(loaded.masks["fc.weight"], masks["fc.weight"])
    assert loaded.metadata == {"rate": 0.5}
    assert _same_function(net, loaded.module, (2, 3, 32, 32))


def test_checkpoint_loads_without_unpickling_code(tmp_path, net):
    io.save_checkpoint(io.Checkpoint("resnet20", net.state_dict(), (1, 3, 32, 32)), tmp_path / "c.pt")
    obj = torch.load(tmp_path / "c.pt", weights_only=True)  # raises if anything but weights is inside
    assert obj["format"] == "rwdeploy-checkpoint"


def test_state_dict_needs_arch(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "s.pt")
    with pytest.raises(OptionError, match="--arch"):
        io.load_model(tmp_path / "s.pt")
    loaded = io.load_model(tmp_path / "s.pt", arch="resnet20")
    assert loaded.input_shape == (1, 3, 32, 32)
    assert _same_function(net, loaded.module, (1, 3, 32, 32))


def test_state_dict_of_another_architecture_is_refused(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "s.pt")
    with pytest.raises(ModelFileError, match="does not fit resnet32"):
        io.load_model(tmp_path / "s.pt", arch="resnet32")


def test_state_dict_with_wrong_shape_names_the_tensor(tmp_path, net):
    sd = dict(net.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=r"layer1\.0\.conv1\.weight has shape \(16, 16, 5, 5\)"):
        io.load_model(tmp_path / "bad.pt", arch="resnet20")


def test_export_program(tmp_path, net):
    ep = torch.export.export(net, (torch.randn(1, 3, 32, 32),))
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = io.load_model(tmp_path / "m.pt2")
    assert loaded.source == "pt2" and loaded.input_shape == (1, 3, 32, 32)
    assert _same_function(net, loaded.module, (1, 3, 32, 32))


def test_pickle_refused_by_default_and_loaded_when_trusted(tmp_path, net):
    torch.save(net, tmp_path / "p.pt")
    with pytest.raises(ModelFileError, match="runs arbitrary code"):
        io.load_model(tmp_path / "p.pt")
    with pytest.raises(OptionError, match="--input-shape"):
        io.load_model(tmp_path / "p.pt", trust_pickle=True)
    loaded = io.load_model(tmp_path / "p.pt", trust_pickle=True, input_shape=(1, 3, 32, 32))
    assert loaded.source == "pickle"
    assert _same_function(net, loaded.module, (1, 3, 32, 32))


@pytest.mark.parametrize("make", ["missing", "empty", "truncated", "garbage", "folder"])
def test_bad_files_give_model_file_errors(tmp_path, net, make):
    path = tmp_path / "m.pt"
    if make == "empty":
        path.write_bytes(b"")
    elif make == "truncated":
        io.save_checkpoint(io.Checkpoint("resnet20", net.state_dict(), (1, 3, 32, 32)), tmp_path / "ok.pt")
        path.write_bytes((tmp_path / "ok.pt").read_bytes()[:4096])
    elif make == "garbage":
        path.write_bytes(os.urandom(2048))
    elif make == "folder":
        path.mkdir()
    with pytest.raises(ModelFileError) as err:
        io.load_model(path)
    assert str(path) in str(err.value)
    assert "\n" not in err.value.one_line()


@pytest.mark.parametrize("text", ["", "abc", "1,3,-2,2", "1", "1,3,x", "0,3,32,32"])
def test_bad_input_shapes(text):
    with pytest.raises(OptionError, match="--input-shape"):
        io.parse_input_shape(text)


def test_input_shape_parsing():
    assert io.parse_input_shape("1,3,32,32") == (1, 3, 32, 32)
    assert io.parse_input_shape(" 8, 1,28 ,28") == (8, 1, 28, 28)


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with io.atomic_file(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_output_location(tmp_path):
    # A regular file where a folder is needed fails for every user, root included.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OptionError, match="cannot create output folder"):
        with io.atomic_file(blocker / "sub" / "x.pt"):
            pass
