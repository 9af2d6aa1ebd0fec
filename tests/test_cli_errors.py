"""Bad input through the real CLI: one line on stderr, non-zero exit, no traceback, nothing written."""
from __future__ import annotations

import pytest
import torch

from rwdeploy import models


def _one_clear_line(res, *needles: str) -> None:
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("rwdeploy: error:")
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_file(tmp_path, cli):
    _one_clear_line(cli("inspect", str(tmp_path / "nope.pt")), "nope.pt", "no such file")


def test_truncated_file(tmp_path, cli):
    torch.save(models.create("lenet5").state_dict(), tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:3000])
    _one_clear_line(cli("inspect", str(tmp_path / "cut.pt"), "--arch", "lenet5"), "cut.pt", "truncated")


def test_corrupt_file(tmp_path, cli):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x05this is not a model" * 50)
    _one_clear_line(cli("inspect", str(tmp_path / "junk.pt")), "junk.pt")


def test_pickle_without_trust_says_why(tmp_path, cli):
    torch.save(models.create("lenet5"), tmp_path / "whole.pt")
    res = cli("inspect", str(tmp_path / "whole.pt"))
    _one_clear_line(res, "whole.pt", "--trust-pickle", "arbitrary code")
    ok = cli("inspect", str(tmp_path / "whole.pt"), "--trust-pickle", "--input-shape", "1,1,28,28")
    assert ok.returncode == 0, ok.stderr


def test_unknown_zoo_name_lists_known(tmp_path, cli):
    torch.save(models.create("lenet5").state_dict(), tmp_path / "s.pt")
    _one_clear_line(cli("inspect", str(tmp_path / "s.pt"), "--arch", "lenet7"), "lenet7", "lenet5", "resnet20")


@pytest.mark.parametrize("shape", ["1,3,a,32", "-1,3,32,32", "32"])
def test_bad_input_shape(cli, shape):
    _one_clear_line(cli("inspect", "zoo:resnet20", "--input-shape", shape), "--input-shape", shape)


def test_input_shape_that_does_not_fit_the_model(cli):
    _one_clear_line(cli("inspect", "zoo:lenet5", "--input-shape", "1,3,28,28"), "1x3x28x28")


def test_unwritable_output_folder(tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("demo", "--out", str(blocker / "out"))
    _one_clear_line(res, "cannot create output folder")
    assert blocker.read_text() == "x"


def test_debug_shows_traceback(tmp_path, cli):
    res = cli("--debug", "inspect", str(tmp_path / "nope.pt"))
    assert res.returncode != 0 and "Traceback" in res.stderr
