"""`rwdeploy prune` under torchrun with two CPU processes (gloo): ranks stay identical."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reweighted", "admm"])
def test_two_cpu_ranks_hold_identical_weights_and_masks(tmp_path, method):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(HERE / "ddp_worker.py"), str(tmp_path), method]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    assert (r0["wrote"], r1["wrote"]) == (True, False)  # the checkpoint is written once, by rank 0
    assert (tmp_path / "model.pt").is_file()
    pruned = sum(int((~m).sum()) for m in r0["masks"].values())
    total = sum(m.numel() for m in r0["masks"].values())
    assert pruned == round(0.7 * total) or abs(pruned / total - 0.7) < 1e-4
    assert r0["acc"] == r1["acc"] and r0["acc"] > 0.5
