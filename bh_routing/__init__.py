"""bh_routing: adaptive expert routing (Benjamini–Hochberg and friends) for Mixture-of-Experts LMs."""
from .pvalues import Calibration, compute_pvalues
from .selection import PAD_INDEX, Router, Routing, bh_select, build_router, route

__version__ = "0.1.0"
__all__ = ["Calibration", "PAD_INDEX", "Router", "Routing", "bh_select", "build_router",
           "compute_pvalues", "route", "__version__"]
