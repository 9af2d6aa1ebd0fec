"""Small constant-size workspaces on the stack: a register tile's accumulators stay registers.

TVM lowers every buffer a kernel allocates (`LowerTVMBuiltin`) to a `TVMBackendAllocWorkspace`
/ `TVMBackendFreeWorkspace` pair unless it is under 1 KB (its runtime's kMaxStackAlloca), and
that size is fixed in C++. A conv / dense register tile of 16 or more 512-bit accumulators is
1 KB or more, so each tile of such a kernel (thousands per layer) called the allocator, zeroed
the buffer with `memset`, stored its 28 accumulator registers into it after the reduction and
read them back for the epilogue, then called the allocator again to free it: LLVM cannot keep a
heap buffer in registers. On the Xeon that was about a fifth of a 1x1 conv with a short
reduction (ResNet-50's 64 -> 256 at 56x56: 0.76 ms against ONNX Runtime's 0.62).

`stack_workspaces_pass` runs after `LowerTVMBuiltin` and turns such allocations of a constant
size up to `STACK_WORKSPACE_BYTES` on the CPU back into plain allocations (LLVM allocas, which
it promotes to registers where every access has a constant offset, as in an unrolled tile),
and drops their null checks and frees. Larger or symbolic ones stay workspaces.
`register_tir_pipeline()` names the s_tir pipeline with this pass (and `tvm_serial_loops`,
`tvm_weight_prefetch`) added to its host finalisation.
"""
from __future__ import annotations

from typing import Any

from rwdeploy.runtime.tvm_tir_rewrite import body_pass, rewrite_children

# Per allocation; a parallel task's allocas live on its worker thread's stack (8 MB).
STACK_WORKSPACE_BYTES = 8192
PIPELINE = "rwdeploy_cpu"
_CPU = 1  # kDLCPU


def _op_name(expr: Any) -> str | None:
    import tvm

    if isinstance(expr, tvm.ir.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return None


def _small_cpu_workspace(stmt: Any, limit: int) -> bool:
    from tvm import tirx

    if not isinstance(stmt, tirx.DeclBuffer) or stmt.data is None:
        return False
    call = stmt.data
    if _op_name(call) != "tirx.TVMBackendAllocWorkspace":
        return False
    device, size = call.args[0], call.args[2]
    return (isinstance(device, tirx.IntImm) and int(device) == _CPU
            and isinstance(size, tirx.IntImm) and int(size) <= limit)


def _is_data_of(expr: Any, buffer: Any) -> bool:
    """Whether `expr` is `buffer`'s data pointer (`tirx.buffer_data(buffer)` in TVM 0.27)."""
    return _op_name(expr) == "tirx.buffer_data" and expr.args[0].same_as(buffer)


def _is_free_of(stmt: Any, buffer: Any) -> bool:
    """`if TVMBackendFreeWorkspace(.., buffer's data) != 0: throw`."""
    from tvm import tirx

    if not isinstance(stmt, tirx.IfThenElse) or stmt.else_case is not None:
        return False
    cond = stmt.condition
    return (type(cond).__name__ == "NE" and _op_name(cond.a) == "tirx.TVMBackendFreeWorkspace"
            and _is_data_of(cond.a.args[2], buffer))


def _is_null_check_of(stmt: Any, buffer: Any) -> bool:
    """`if isnullptr(buffer's data): throw`."""
    from tvm import tirx

    return (isinstance(stmt, tirx.IfThenElse) and stmt.else_case is None
            and _op_name(stmt.condition) == "tirx.isnullptr" and _is_data_of(stmt.condition.args[0], buffer))


def _rewrite(stmt: Any, limit: int) -> Any:
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        # only an allocation freed in this same sequence moves: a free left behind for a stack
        # buffer would hand the workspace pool a pointer it never gave out
        moved = [child.buffer for child in stmt.seq if _small_cpu_workspace(child, limit)
                 and any(_is_free_of(other, child.buffer) for other in stmt.seq)]
        out = []
        for child in stmt.seq:
            if isinstance(child, tirx.DeclBuffer) and any(child.buffer.same_as(b) for b in moved):
                out.append(tirx.AllocBuffer(child.buffer))
            elif any(_is_free_of(child, b) or _is_null_check_of(child, b) for b in moved):
                continue
            else:
                out.append(_rewrite(child, limit))
        if len(out) == len(stmt.seq) and all(a.same_as(b) for a, b in zip(out, stmt.seq)):
            return stmt
        return tirx.SeqStmt(out)
    return rewrite_children(stmt, lambda child: _rewrite(child, limit))


def stack_workspaces_pass(limit: int = STACK_WORKSPACE_BYTES) -> Any:
    """A TIR module pass (after `LowerTVMBuiltin`): constant-size CPU workspaces of up to
    `limit` bytes become stack allocations."""
    return body_pass("rwdeploy.StackWorkspaces", lambda body: _rewrite(body, limit))


def register_tir_pipeline() -> str:
    """Register (once) and return the name of TVM's s_tir pipeline with `stack_workspaces_pass`,
    `tvm_serial_loops.serial_loops_pass` and `tvm_weight_prefetch.weight_prefetch_pass` after
    its host finalisation: the `tir_pipeline` of cpu builds."""
    import tvm
    from tvm.tirx import compilation_pipeline as pipelines

    from rwdeploy.runtime.tvm_serial_loops import serial_loops_pass
    from rwdeploy.runtime.tvm_weight_prefetch import weight_prefetch_pass

    if PIPELINE not in pipelines.PIPELINE_MAP:
        base = pipelines.PIPELINE_MAP["s_tir"]

        def factory(**kwargs: Any) -> Any:
            lower, finalize_host, finalize_device = base(**kwargs)

            def host() -> Any:
                return tvm.transform.Sequential([finalize_host(), stack_workspaces_pass(), serial_loops_pass(),
                                                 weight_prefetch_pass()])

            return lower, host, finalize_device

        pipelines.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE
