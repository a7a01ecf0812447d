"""Counterfactual methods; importing this package registers the built-in ones."""
from engine.methods.base import Method, config_hash, get_method_class, make_config, make_method, method_names, register

# Built-in methods register themselves on import (after `base`, which they import).
from engine.methods import gradual_construction, wachter  # noqa: E402,F401  isort: skip
from engine.methods import cdeepex, xgem  # noqa: E402,F401  isort: skip
from engine.methods import introspection  # noqa: E402,F401  isort: skip
from engine.methods import aip, fgsm  # noqa: E402,F401  isort: skip
from engine.methods import exaggeration  # noqa: E402,F401  isort: skip
from engine.methods import growing_spheres  # noqa: E402,F401  isort: skip

__all__ = ["Method", "config_hash", "get_method_class", "make_config", "make_method", "method_names", "register"]
