"""The window-ELL layout of batch-1 CSR Linear layers (`runtime.tvm_window_ell`): the packing
against a hand-made example and the dense matrix, the AVX-512 kernel against numpy over random
shapes (float32 and int8 values), and the pipeline rewrite (which calls it takes, which it leaves)."""
import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from rwdeploy.runtime import tvm_window_ell as E
from rwdeploy.runtime.layer_formats import Candidate, build_candidates, candidate_module
from rwdeploy.runtime.tvm_build import resolve_target
from rwdeploy.runtime.tvm_sparse import host_target
from rwdeploy.sparse import pack as pack_csr

needs_avx512 = pytest.mark.skipif(not E.supports(host_target()),
                                  reason="the window-ELL kernel needs an x86 CPU with AVX-512")


def _csr(w: np.ndarray, rng: np.random.Generator | None = None):
    """CSR arrays of `w`, columns shuffled within each row when `rng` is given."""
    rows = [np.nonzero(r)[0] for r in w]
    if rng is not None:
        rows = [rng.permutation(r) for r in rows]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    cols = np.concatenate(rows + [np.zeros(0, np.int64)]).astype(np.int32)
    vals = w[np.repeat(np.arange(w.shape[0]), np.diff(indptr)), cols]
    return vals, cols, indptr


def test_pack_hand_made_example():
    # row 0: columns 0 and 65 (windows 0 and 1); row 1: columns 1, 2, 3; row 2: empty
    w = np.zeros((3, 70), np.float32)
    w[0, 0], w[0, 65] = 1.0, 2.0
    w[1, 1:4] = [3.0, 4.0, 5.0]
    ell = E.pack(*_csr(w), 3, 70)
    assert ell.step_ptr.tolist() == [0, 3, 4]     # window 0: row 1's three; window 1: one
    assert ell.values.reshape(-1, E.LANES)[:, :3].tolist() == [[1, 3, 0], [0, 4, 0], [0, 5, 0], [2, 0, 0]]
    assert ell.index.reshape(-1, E.LANES)[:, :3].tolist() == [[0, 1, 0], [0, 2, 0], [0, 3, 0], [1, 0, 0]]
    np.testing.assert_array_equal(ell.to_dense(), w)


@pytest.mark.parametrize("rows,cols,sparsity", [(37, 150, 0.8), (16, 64, 0.0), (100, 257, 0.97), (5, 3, 0.5)])
def test_pack_round_trips_and_pads_to_the_fullest_row(rows, cols, sparsity):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    w[rows // 2] = 0                                     # an empty row
    ell = E.pack(*_csr(w, rng), rows, cols)              # columns unsorted within rows
    np.testing.assert_array_equal(ell.to_dense(), w)
    padded = np.zeros((ell.blocks * E.LANES, ell.windows * E.WINDOW), bool)
    padded[:rows, :cols] = w != 0
    per_lane = padded.reshape(ell.blocks, E.LANES, ell.windows, E.WINDOW).sum(axis=3)
    assert np.diff(ell.step_ptr).tolist() == per_lane.max(axis=1).reshape(-1).tolist()
    assert ell.index.max(initial=0) < E.WINDOW


def _run_kernel(w: np.ndarray, x: np.ndarray, bias: np.ndarray, int8: bool, rng) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = w.shape
    scale = np.ones(1, np.float32)
    dense = w.astype(np.float64)
    if int8:
        scale = (2.0 ** rng.integers(-8, -2, rows)).astype(np.float32)
        w = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        dense = w.astype(np.float64) * scale[:, None]
    ell = E.pack(*_csr(w), rows, cols)
    spec = E.WindowEllSpec(rows, cols, ell.steps, "int8" if int8 else "float32")
    lib = tvm.compile(tvm.IRModule({"f": E.kernel(spec)}), target=host_target())
    args = [x, ell.values, ell.index, ell.step_ptr, bias, scale,
            np.full(spec.scratch_shape, np.nan, np.float32), np.zeros((1, rows), np.float32)]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    lib[spec.name()](*args)
    return args[-1].numpy(), x.astype(np.float64) @ dense.T + bias


@needs_avx512
@pytest.mark.parametrize("rows,cols,sparsity,int8", [
    (1024, 4096, 0.95, False), (1000, 1000, 0.9, False), (17, 65, 0.5, False), (33, 130, 0.99, False),
    (64, 64, 0.0, False), (48, 200, 1.0, False), (200, 300, 0.9, True), (31, 129, 0.6, True)])
def test_kernel_matches_numpy(rows, cols, sparsity, int8):
    rng = np.random.default_rng(rows * cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0
    x = rng.standard_normal((1, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    y, ref = _run_kernel(w, x, bias, int8, rng)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * max(1.0, np.abs(ref).max()) * np.sqrt(cols))


def _kernel_names(mod: tvm.IRModule) -> list[str]:
    return sorted(g.name_hint for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def test_pass_rewrites_batch_one_csr_only():
    torch.manual_seed(0)
    layer = torch.nn.Linear(300, 70)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.9] = 0
    csr, bsr = pack_csr(layer.weight), pack_csr(layer.weight[:, :300], (1, 4))
    cands = [Candidate("csr_b1", layer, (1, 300), csr, 0), Candidate("csr_b2", layer, (2, 300), csr, 1),
             Candidate("bsr_b1", layer, (1, 300), bsr, 2)]
    mod = E.window_ell_pass()(candidate_module(cands))
    names = _kernel_names(mod)
    assert sum(n.startswith("rw_linear_window_ell_") for n in names) == 1
    assert sum(n.startswith("rw_linear_sparse_") for n in names) == 2   # batch 2 and the 1x4 blocks stay
    calls = [c for c in relax.analysis.all_global_vars(mod["cand0_csr_b1"])]
    assert any(g.name_hint.startswith("rw_linear_window_ell_") for g in calls)


def test_only_avx512_x86_targets_take_it():
    assert not E.supports(resolve_target("arm").tvm())
    assert not E.supports(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))   # AVX2: 8 lanes
    assert E.supports(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))


@needs_avx512
def test_built_candidate_matches_torch():
    torch.manual_seed(1)
    layer = torch.nn.Linear(700, 90)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.95] = 0
    x = torch.randn(1, 700)
    cand = Candidate("csr", layer, (1, 700), pack_csr(layer.weight), 0)
    vm = relax.VirtualMachine(build_candidates([cand], host_target()), tvm.cpu())
    y = vm[cand.function](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
