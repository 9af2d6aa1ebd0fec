"""Inline the autocast regions of a `torch.export` graph that do nothing on this device.

`torch.export` keeps a `with torch.autocast(...)` block as one higher-order call,
`wrap_with_autocast(device_type, dtype, enabled, cache_enabled, body, *operands)`, whose body
is a separate GraphModule the channel analysis cannot see into. A block that is disabled
(EfficientViT's attention turns autocast *off* around its linear attention) or that targets
another device type than the one the model runs on computes exactly its body, so the body's
nodes replace the call. An enabled block on the model's own device changes dtypes and stays.
"""
from __future__ import annotations

import operator

import torch
from torch import fx


def _autocast_op() -> object | None:
    return getattr(torch.ops.higher_order, "wrap_with_autocast", None)


def _inactive(device_type: object, enabled: object, run_on: str) -> bool:
    return enabled is False or (isinstance(device_type, str) and device_type != run_on)


def inline_inactive_autocast(gm: fx.GraphModule, run_on: str = "cpu") -> int:
    """Inline, in place, every autocast region of `gm` that is inactive on `run_on`; returns how
    many were inlined. Regions whose body holds attributes of its own, or whose results are
    used other than by indexing, stay as they are."""
    op = _autocast_op()
    if op is None:
        return 0
    inlined = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not op or len(node.args) < 5:
            continue
        device_type, _dtype, enabled, _cache, body_node, *operands = node.args
        body = getattr(gm, body_node.target, None) if body_node.op == "get_attr" else None
        if not _inactive(device_type, enabled, run_on) or not isinstance(body, fx.GraphModule):
            continue
        if any(n.op in ("get_attr", "call_module") for n in body.graph.nodes):
            continue
        if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            continue
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue
        with gm.graph.inserting_before(node):
            results = gm.graph.graph_copy(body.graph, dict(zip(placeholders, operands)))
        results = results if isinstance(results, (tuple, list)) else (results,)
        for user in list(node.users):
            user.replace_all_uses_with(results[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not body_node.users:
            gm.graph.erase_node(body_node)
            delattr(gm, body_node.target)
        inlined += 1
    if inlined:
        gm.graph.lint()
        gm.recompile()
    return inlined
