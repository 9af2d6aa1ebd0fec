"""A kernel whose epilogue adds a tensor that dies there writes its output over that tensor.

A residual block's last conv adds the shortcut in its epilogue (`tvm_schedule._inline_epilogue`):
it reads the shortcut tensor once, element by element, and writes a new tensor of the same
shape. Where these do not fit in L2 (ResNet-50's layer1: 56 x 56 x 256 floats, 3.2 MB each)
the write to a fresh tensor first reads each of its cache lines from L3 to own it, so the conv
moves three tensors' worth of lines where the same conv without the add (the block's shortcut
conv) moves two: on the Xeon 0.84-0.90 ms a call against 0.61. ONNX Runtime sums into the
shortcut's buffer (its Conv's `Sum` input): 0.64-0.67 ms.

`inplace_epilogue_pass` (Relax, after `CallTIRRewrite`, before memory planning) finds each
kernel call `f(..., r, ..., out)` where `out` is a fresh allocation and `r`

- is a kernel's output (an allocation, not a function parameter, a constant or a view),
  of `out`'s shape and type, passed once, and used by nothing after this call;
- is read by `f` only where `f` writes `out` (`reads_only_where_written`): one block writes
  `out`, each of its instances one element, and it reads `r` at that same element only,
  so every element of `r` is read before the same element of `out` is written, and by
  the same statement;

and passes `r` as the output instead: the allocation goes, and the later uses of `out` read `r`.
"""
from __future__ import annotations

from typing import Any

SPATIAL = 0  # tirx IterVar kind (data parallel)


def _blocks(sch: Any) -> list[Any]:
    found, pending = [], [sch.get_sblock("root")]
    while pending:
        block = pending.pop()
        children = sch.get_child_blocks(block)
        found += children
        pending += children
    return found


def _loads_of(expr: Any, buffer: Any) -> list[Any]:
    from tvm import tirx

    from rwdeploy.runtime.tvm_tir_rewrite import buffer_loads

    return [load for load in buffer_loads(expr) if load.source.same_as(buffer)] \
        if isinstance(expr, tirx.Expr) else []


def reads_only_where_written(func: Any, read_param: int, write_param: int) -> bool:
    """Whether scheduled PrimFunc `func` reads parameter `read_param`'s buffer only in the one
    block that writes `write_param`'s, each instance of it one element, at that element: then
    the two may be the same memory."""
    import tvm_ffi
    from tvm import s_tir, tirx

    # TVM 0.27's tirx: a parameter is its buffer (a Var), as regions' and loads' `source`
    source, target = func.params[read_param], func.params[write_param]
    try:
        sch = s_tir.Schedule(func)
        blocks = [sch.get(b) for b in _blocks(sch)]
    except Exception:   # no block structure: not a kernel we know
        return False
    if any(r.source.same_as(source) for b in blocks for r in b.writes):
        return False   # an output itself (a kernel of several outputs)
    writers = [b for b in blocks if any(r.source.same_as(target) for r in b.writes)]
    readers = [b for b in blocks if any(r.source.same_as(source) or r.source.same_as(target)
                                        for r in b.reads)]
    if len(writers) != 1 or any(not r.same_as(writers[0]) for r in readers):
        return False
    block = writers[0]
    store = block.body
    if (not isinstance(store, tirx.BufferStore) or not store.buffer.same_as(target)
            or any(iv.iter_type != SPATIAL for iv in block.iter_vars)):
        return False
    block_vars = [iv.var for iv in block.iter_vars]
    # one element per instance: the store's indices are distinct block variables
    if (not all(any(i.same_as(v) for v in block_vars) for i in store.indices)
            or len({id(v) for i in store.indices for v in block_vars if i.same_as(v)}) != len(store.indices)):
        return False
    loads = _loads_of(store.value, source)
    if not loads or _loads_of(store.value, target):
        return False
    return all(len(load.indices) == len(store.indices)
               and all(tvm_ffi.structural_equal(a, b) for a, b in zip(load.indices, store.indices))
               for load in loads)


def _is_kernel_call(mod: Any, expr: Any) -> bool:
    import tvm
    from tvm import relax

    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.GlobalVar)
            and isinstance(mod[expr.op], tvm.tirx.PrimFunc))


def rewrite_bindings(mod: Any, bindings: list[Any], returned: Any,
                     written: list[str] | None = None) -> list[Any] | None:
    """`bindings` (one block of a function lowered by CallTIRRewrite) with each eligible call
    writing in place (its kernel's name appended to `written`); None where nothing changed."""
    import tvm_ffi
    from tvm import relax

    allocations = {b.var for b in bindings if isinstance(b.value, relax.Call)
                   and getattr(b.value.op, "name", "") == "relax.builtin.alloc_tensor"}
    root: dict[Any, Any] = {a: a for a in allocations}   # var -> the allocation it names
    for b in bindings:
        if isinstance(b.value, relax.Var) and b.value in root:
            root[b.var] = root[b.value]
    uses: dict[Any, list[int]] = {}
    escapes: set[Any] = set()   # names used other than as a kernel's argument or an alias
    for index, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            uses.setdefault(v, []).append(index)
            if not (isinstance(b.value, relax.Var) or _is_kernel_call(mod, b.value)):
                escapes.add(v)   # e.g. a reshape's view of it, which may outlive the call
    for v in relax.analysis.free_vars(returned):
        uses.setdefault(v, []).append(len(bindings))

    replaced: dict[Any, Any] = {}   # an output allocation -> the tensor written instead
    out = list(bindings)
    for index, b in enumerate(bindings):
        call = b.value
        if not _is_kernel_call(mod, call) or not call.args:
            continue
        target = call.args[-1]
        if target not in allocations or not root[target].same_as(target):
            continue
        for position, arg in enumerate(call.args[:-1]):
            if not isinstance(arg, relax.Var) or arg not in root:
                continue
            names = [v for v, r in root.items() if r.same_as(root[arg])]
            if (sum(1 for a in call.args if any(a.same_as(v) for v in names)) != 1
                    or any(v in escapes for v in names)
                    or any(i > index for v in names for i in uses.get(v, []))):
                continue
            if not tvm_ffi.structural_equal(arg.ty, target.ty):
                continue
            if not reads_only_where_written(mod[call.op], position, len(call.args) - 1):
                continue
            replaced[target] = arg
            if written is not None:
                written.append(call.op.name_hint)
            out[index] = relax.VarBinding(b.var, relax.Call(call.op, [*call.args[:-1], arg], call.attrs,
                                                            call.ty_args, call.span))
            break
    if not replaced:
        return None
    result = []
    for b in out:
        if b.var in replaced:       # the allocation no longer needed
            continue
        if isinstance(b.value, relax.Var) and b.value in replaced:
            b = relax.VarBinding(b.var, replaced[b.value])
        result.append(b)
    return result


def inplace_epilogue_pass(stats: dict[str, list[str]] | None = None) -> Any:
    """A Relax module pass (after `CallTIRRewrite`): eligible kernel calls write their output
    over a tensor their epilogue reads and nothing reads after (see the module doc); their
    kernels' names go to `stats["in place"]`."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.InplaceEpilogue")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            # one block of plain bindings (what ToNonDataflow leaves): every later use is in it
            blocks = func.body.blocks
            if len(blocks) != 1 or isinstance(blocks[0], relax.DataflowBlock):
                continue
            new = rewrite_bindings(mod, list(blocks[0].bindings), func.body.body,
                                   None if stats is None else stats.setdefault("in place", []))
            if new is not None:
                body = relax.SeqExpr([relax.BindingBlock(new)], func.body.body)
                updates[gvar] = relax.Function(func.params, body, func.ret_ty, func.is_pure,
                                               func.attrs, func.span)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return rewrite
