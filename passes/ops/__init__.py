"""Op specs by family (`spec.OpSpec`, `layer.LayerView`); importing this package registers them.

Adding an op is one spec in the family file it belongs to (or a new family file imported
below) plus a test network in tests/nets.py that the exactness tests run.
"""
from rwdeploy.passes.ops import (  # noqa: F401  (each family registers its specs)
    attention, conv, elementwise, graph, indexing, linear, norm, pooling, recurrent, reduce, shape,
)
from rwdeploy.passes.ops.layer import LayerView
from rwdeploy.passes.ops.spec import SPECS, OpSpec, classify, layer_view, module_layer_view

__all__ = ["SPECS", "LayerView", "OpSpec", "classify", "layer_view", "module_layer_view"]
