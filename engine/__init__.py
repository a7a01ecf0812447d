"""cfaudit: a counterfactual auditing engine for deep classifiers."""

__version__ = "0.1.0"
