"""Shared plumbing of the TIR passes that rewrite lowered function bodies (`tvm_stack_tiles`,
`tvm_serial_loops`): TVM 0.27's Python API has no statement mutator, so each pass walks the
statement kinds a lowered CPU kernel holds and rebuilds only what changed; `buffer_loads` finds
the loads in an expression (`tvm_weight_prefetch`, `tvm_inplace_epilogue`)."""
from __future__ import annotations

from typing import Any, Callable, Iterator


def rewrite_children(stmt: Any, visit: Callable[[Any], Any]) -> Any:
    """`stmt` with `visit` applied to its child statements (loops, attributes, branches,
    while loops, sequences); itself when no child changed. Other statements are leaves."""
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        seq = [visit(child) for child in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.For):
        body = visit(stmt.body)
        return stmt if body.same_as(stmt.body) else with_loop(stmt, body=body)
    if isinstance(stmt, tirx.AttrStmt):
        body = visit(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body)
    if isinstance(stmt, tirx.IfThenElse):
        then = visit(stmt.then_case)
        other = None if stmt.else_case is None else visit(stmt.else_case)
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return tirx.IfThenElse(stmt.condition, then, other)
    if isinstance(stmt, tirx.While):
        body = visit(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body)
    return stmt


def with_loop(loop: Any, *, body: Any = None, kind: Any = None) -> Any:
    """A copy of the For `loop` with another body and/or loop kind."""
    from tvm import tirx

    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind if kind is None else kind,
                    loop.body if body is None else body, loop.thread_binding, loop.annotations,
                    getattr(loop, "step", None))


def body_pass(name: str, rewrite: Callable[[Any], Any], applies: Callable[[Any], bool] = lambda func: True) -> Any:
    """A TIR module pass replacing the body of each PrimFunc that `applies` to by `rewrite(body)`."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name=name)
    def run(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and applies(func):
                body = rewrite(func.body)
                if not body.same_as(func.body):
                    updates[gvar] = func.with_body(body)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return run


def buffer_loads(expr: Any) -> Iterator[Any]:
    """The BufferLoads in `expr`, outermost first."""
    import tvm
    from tvm import tirx

    if isinstance(expr, tvm.ir.expr.TensorLoad):  # what tirx.BufferLoad builds
        yield expr
        for index in expr.indices:
            yield from buffer_loads(index)
        return
    for field in ("a", "b", "value", "base", "stride", "condition", "true_value", "false_value"):
        child = getattr(expr, field, None)
        if isinstance(child, tirx.Expr):
            yield from buffer_loads(child)
    for arg in getattr(expr, "args", None) or ():
        if isinstance(arg, tirx.Expr):
            yield from buffer_loads(arg)
