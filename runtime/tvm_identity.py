"""Relax calls that compute nothing, removed before legalisation: `broadcast_to` a tensor's own
shape.

`torch.export` writes attention's operands through `expand` to their own shape before each
`bmm`, which arrives as `broadcast_to(x, shape(x))` then `reshape`. A reshape alone is a view in
the Relax VM, but the broadcast is a kernel: fused with the reshape it copies the whole tensor
(ViT-Tiny: the attention probabilities, 3 x 197 x 197 a block, 0.36 ms in all).
"""
from __future__ import annotations

from typing import Any


def identity_broadcast_pass() -> Any:
    """A Relax module pass: broadcast_to(x, s) with s the static shape of x -> x."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import is_op, rewrite_functions, static_shape

    @relax.expr_functor.mutator
    class DropIdentityBroadcast(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if is_op(call, "relax.broadcast_to"):
                source, target = static_shape(call.args[0]), static_shape(call)
                if source is not None and source == target:
                    return call.args[0]
            return call

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.DropIdentityBroadcast")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(DropIdentityBroadcast(mod), mod)

    return rewrite
