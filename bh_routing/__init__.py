"""bh_routing: adaptive expert routing (Benjamini–Hochberg and friends) for Mixture-of-Experts LMs."""
from .pvalues import Calibration, compute_pvalues
from .selection import PAD_INDEX, Router, Routing, bh_select, build_router, route


def __getattr__(name):  # the patcher imports transformers: load it only when asked for
    if name in ("RoutingPatch", "collect_router_logits", "find_moe_blocks"):
        from . import patching
        return getattr(patching, name)
    if name == "RoutingRecorder":
        from .recording import RoutingRecorder
        return RoutingRecorder
    raise AttributeError(f"module 'bh_routing' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = ["Calibration", "PAD_INDEX", "Router", "Routing", "RoutingPatch", "RoutingRecorder", "bh_select",
           "build_router", "collect_router_logits", "compute_pvalues", "find_moe_blocks", "route", "__version__"]
