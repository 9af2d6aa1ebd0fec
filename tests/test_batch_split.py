"""Running the first layers of a batch one image at a time (`runtime.tvm_batch_split`): where
the cut goes (after the large tensors, never inside a residual block, not at all when nothing
is large or the batch is 1; the first tier of sizes with a cut), the core's cache read from
sysfs, and that the split build computes what torch does."""
import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_batch_split as split
from rwdeploy.runtime import tvm_build, tvm_schedule

nn = torch.nn


class Block(nn.Module):
    """conv -> relu -> conv, plus the input (a residual: two values live inside it)."""

    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Block(16),      # 16 x 16 x 16
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU6(),     # 32 x 8 x 8
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _main(model: nn.Module, x: torch.Tensor):
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16))(tvm_build.import_relax(model, x))
    return mod["main"]


def test_cut_follows_the_large_tensors_and_keeps_residual_blocks_whole():
    x = torch.randn(4, 3, 16, 16)
    main = _main(_net(), x)
    bindings = list(main.body.blocks[0].bindings)
    # 4 x 16 x 16 x 16 floats = 64 KiB: large from 64 KiB; the 4 x 8 x 8 x 32 ones (32 KiB) not
    cut = split.split_point(main, 64 << 10)
    assert cut is not None
    shape = [int(d) for d in bindings[cut].var.ty.shape]
    assert shape == [4, 8, 8, 32]          # past the 16x16 stage, after the stride-2 conv's ReLU6
    sizes = [split._tensor_bytes(b.var.ty) for b in bindings[cut + 1:]]
    assert max(s for s in sizes if s is not None) < 64 << 10
    # with a threshold so small that the 8x8 tensors are large too, the cut moves on, but never
    # to a point inside the residual block, where the block input is still live
    later = split.split_point(main, 2 << 10)
    assert later is None or later > cut
    assert split.split_point(main, 1 << 30) is None                  # nothing large
    assert split.split_point(_main(_net(), x[:1]), 1 << 10) is None  # batch 1


class InvertedResidual(nn.Module):
    """x + project(relu(expand(x))): the large tensor is inside the block, its input and
    output are small (MobileNetV2's block)."""

    def __init__(self, c: int, wide: int):
        super().__init__()
        self.expand, self.project = nn.Conv2d(c, wide, 1), nn.Conv2d(wide, c, 1)

    def forward(self, x):
        return x + self.project(torch.relu(self.expand(x)))


def test_cut_is_never_inside_a_residual_block():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), InvertedResidual(8, 64),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 4)).eval()
    main = _main(model, torch.randn(2, 3, 16, 16))
    bindings = list(main.body.blocks[0].bindings)
    # 2 x 16 x 16 x 64 = 128 KiB large, the 8-channel tensors (16 KiB) not
    cut = split.split_point(main, 64 << 10)
    residual = [i for i, b in enumerate(bindings) if getattr(b.value, "op", None) is not None
                and b.value.op.name == "relax.add" and all(isinstance(a, tvm.relax.Var) for a in b.value.args)]
    assert len(residual) == 1 and cut is not None and cut >= residual[0]   # not at the projection


@pytest.mark.parametrize("batch", [2, 5])
def test_split_build_matches_torch(batch, monkeypatch):
    model = _net()
    x = torch.randn(batch, 3, 16, 16)
    # the first tier (half the cache) at 12 KiB an image: the 16x16 stage (16 KiB) large, the
    # 8x8 one (8 KiB) not
    cache = 24 * 1024 * batch
    monkeypatch.setattr(split, "core_cache_bytes", lambda default=0: cache)
    assert split.choose_cut(_main(model, x), cache) is not None
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_split_function_has_one_copy_per_image_and_the_same_output_type():
    x = torch.randn(3, 3, 16, 16)
    main = _main(_net(), x)
    cut = split.split_point(main, 48 << 10)
    out = split.split_batch(main, cut)

    def convs(bindings) -> int:
        return sum(getattr(getattr(b.value, "op", None), "name", "") == "relax.nn.conv2d" for b in bindings)

    def concats(bindings) -> int:
        return sum(getattr(getattr(b.value, "op", None), "name", "") == "relax.concat" for b in bindings)

    before, after = list(main.body.blocks[0].bindings), list(out.body.blocks[0].bindings)
    assert concats(after) == 1
    assert convs(after) == 3 * convs(before[:cut + 1]) + convs(before[cut + 1:])
    assert str(out.ret_ty) == str(main.ret_ty) == "R.Tensor((3, 10), dtype=\"float32\")"


def _write_cache(base, index: str, level: int, kind: str, size: str) -> None:
    entry = base / index
    entry.mkdir()
    for name, text in (("level", str(level)), ("type", kind), ("size", size)):
        (entry / name).write_text(text + "\n")


def test_core_cache_is_the_level_2_data_cache_and_skips_other_entries(tmp_path):
    """sysfs lists a `uevent` file beside the cache indices (the earlier reader stopped there and
    returned its default); the level-2 size is read whatever the order, instruction caches and
    other levels left out."""
    (tmp_path / "uevent").write_text("")
    _write_cache(tmp_path, "index0", 1, "Data", "48K")
    _write_cache(tmp_path, "index1", 1, "Instruction", "64K")
    _write_cache(tmp_path, "index2", 2, "Unified", "1280K")
    _write_cache(tmp_path, "index3", 3, "Unified", "491520K")
    assert split.core_cache_bytes(default=7, base=str(tmp_path)) == 1280 << 10
    assert split.core_cache_bytes(default=7, base=str(tmp_path / "absent")) == 7
    (tmp_path / "index2" / "size").write_text("garbage\n")
    assert split.core_cache_bytes(default=7, base=str(tmp_path)) == 7


def test_core_cache_is_read_from_the_machine():
    assert 64 << 10 <= split.core_cache_bytes() <= 64 << 20


def test_first_tier_with_a_cut_decides():
    """Half the cache first: where every tensor up to the pooling is large at that size there is
    no cut after the last one, and the next tier's cut (twice the cache) is taken."""
    x = torch.randn(4, 3, 16, 16)
    main = _main(_net(), x)
    bindings = list(main.body.blocks[0].bindings)
    # 32 KiB cache: tier 0.5 -> 16 KiB, every 16x16 (64 KiB) and 8x8 (32 KiB) tensor is large,
    # and the pooling ends the per-image ops right after the last of them; tier 2 -> 64 KiB
    assert split.split_point(main, 16 << 10) is None
    cut = split.choose_cut(main, 32 << 10)
    assert cut == split.split_point(main, 64 << 10) and cut is not None
    assert [int(d) for d in bindings[cut].var.ty.shape] == [4, 8, 8, 32]
    # 128 KiB cache: tier 0.5 -> 64 KiB already cuts there
    assert split.choose_cut(main, 128 << 10) == cut
    assert split.choose_cut(main, 1 << 30) is None


def test_a_cut_with_one_conv_per_image_is_not_taken(monkeypatch):
    """Only the first conv's output is large: its cut (before the pool) would run one conv per
    image, which does not pay the split's copies (`MIN_CONVS_PER_IMAGE`)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    main = _main(model, torch.randn(4, 3, 16, 16))
    bindings = list(main.body.blocks[0].bindings)
    # 64 KiB cache: tier 0.5 -> 32 KiB, only the 4 x 16 x 16 x 16 conv output (64 KiB) is large
    cut = split.split_point(main, 32 << 10)
    assert cut is not None and split.convs_through(bindings, cut) == 1
    assert split.choose_cut(main, 64 << 10) is None
    monkeypatch.setattr(split, "MIN_CONVS_PER_IMAGE", 1)
    assert split.choose_cut(main, 64 << 10) == cut


class AddsABatchShapedConstant(nn.Module):
    """An early add of a constant with its own batch axis: one image plus it would be B images."""

    def __init__(self, batch: int):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.register_buffer("offset", torch.randn(batch, 16, 16, 16))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + self.offset).flatten(1)


def test_a_batch_shaped_constant_stops_the_split(monkeypatch):
    model = AddsABatchShapedConstant(3).eval()
    x = torch.randn(3, 3, 16, 16)
    assert split.choose_cut(_main(model, x), 24 * 1024 * 3) is None
    monkeypatch.setattr(split, "core_cache_bytes", lambda default=0: 24 * 1024 * 3)
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_tuple_bindings_are_split_too():
    """A decomposed batch norm's (y, mean, var) tuple and its getitem (what a slim model from
    `remove_zero_channels` imports as) stay in the per-image part; the split function computes
    what the original does."""
    from tvm import relax

    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((3, 3, 4, 4)).astype("float32"))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, 8, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, padding=1, data_layout="NHWC", kernel_layout="HWIO"))
            t = bb.emit(relax.Tuple([y, relax.const(np.ones(4, "float32"))]))
            z = bb.emit(relax.op.nn.relu(bb.emit(relax.TupleGetItem(t, 0))))
            z = bb.emit(relax.op.nn.conv2d(z, w, strides=2, padding=1, data_layout="NHWC", kernel_layout="HWIO"))
            out = bb.emit_output(relax.op.nn.relu(z))
        bb.emit_func_output(out)
    main = bb.get()["main"]
    cut = split.split_point(main, 2048)   # 2 x 8 x 8 x 4 floats = 2 KiB: large; 2 x 4 x 4 x 4 not
    bindings = list(main.body.blocks[0].bindings)
    assert cut is not None and [int(d) for d in bindings[cut].var.ty.shape] == [2, 4, 4, 4]
    target = tvm.target.Target({"kind": "llvm"})
    data = tvm.runtime.tensor(rng.standard_normal((2, 8, 8, 4)).astype("float32"))
    outs = []
    for func in (main, split.split_batch(main, cut)):
        ex = tvm.compile(tvm.IRModule({"main": func}), target=target,
                         relax_pipeline=tvm_build.cpu_pipeline(target, {}))
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](data).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
