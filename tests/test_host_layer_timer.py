"""The host's layer timer measures at the artifact's thread count (compile's --threads), not at
the process's, and leaves TVM's thread pool as it found it."""
import torch
from torch import nn

from rwdeploy.passes.pack_sparse import pack_sparse
from rwdeploy.runtime import layer_formats, tvm_sparse
from rwdeploy.runtime.tvm_build import set_threads
from rwdeploy.sparse.timing import HostLayerTimer, layer_timer
from sparse_support import small_sparse_net


def _net() -> nn.Module:
    return small_sparse_net(4, 8, 16, 0.9)


def test_measures_at_the_given_threads_and_restores_the_pool(monkeypatch):
    seen = []
    real = layer_formats.measure_layer_formats

    def spy(layers, target=None, pairs=()):
        seen.append(tvm_sparse.threads())
        return real(layers, target, pairs) if layers else {}

    monkeypatch.setattr(layer_formats, "measure_layer_formats", spy)
    set_threads(2)
    try:
        timer = layer_timer("cpu", threads=1)
        res = pack_sparse(torch.fx.symbolic_trace(_net()), torch.randn(1, 4, 6, 6), target="cpu", timer=timer)
        assert seen == [1]
        assert tvm_sparse.threads() == 2
        assert res.record.measured_on == timer.where and timer.where.endswith("1 thread")
        # every packed layer was measured (dense and its formats), at 1 thread
        assert all({"dense", "csr"} <= set(l.measured_ms) for l in res.record.layers)
        seen.clear()
        HostLayerTimer("cpu")([])  # without threads: the process's count
        assert seen == [2]
    finally:
        set_threads(tvm_sparse.threads())


def test_compile_gives_the_timer_its_threads():
    assert layer_timer("cpu", threads=3).threads == 3
    assert layer_timer("cpu").threads is None
