"""rwdeploy: reweighted pruning to a measured, deployable artifact."""
from __future__ import annotations

__version__ = "0.1.0"

from rwdeploy.errors import RwdeployError  # noqa: E402

__all__ = ["RwdeployError", "__version__"]
