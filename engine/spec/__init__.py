"""Typed, validated job specs (YAML) for every workflow."""
from engine.spec.audit import AuditSpec, DatasetRef, FleetModel, MethodEntry, QuerySpec, RuntimeSpec, TrainEntry
from engine.spec.loading import SpecError, load_spec, parse_spec

__all__ = ["AuditSpec", "DatasetRef", "FleetModel", "MethodEntry", "QuerySpec", "RuntimeSpec", "SpecError",
           "TrainEntry", "load_spec", "parse_spec"]
