"""train(spec): train, or fetch from the content-addressed cache, every built-in model a spec names."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from engine.data import dataset_fingerprint, load_dataset
from engine.models.fleet import resolve_classifier
from engine.spec import AuditSpec, SpecError, load_spec
from engine.spec.train import DEFAULT_ARCH, TrainSpec
from engine.workflows.stages import Stages


def train(spec: TrainSpec, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Returns model id -> the zoo's info (key, cache_hit, path, seconds, history, ...)."""
    from engine.models.zoo import get_or_train

    stages = Stages(log)
    infos: dict[str, dict] = {}
    for entry in spec.models:
        with stages.stage(f"train {entry.id}"):
            data = load_dataset(spec.dataset.name, "train", **{**spec.dataset.options, **entry.dataset_options})
            _, info = get_or_train(entry.kind, entry.arch or DEFAULT_ARCH[entry.kind], entry.arch_options, data,
                                   dataset_fingerprint(data), entry.train_kwargs(), entry.seed, spec.cache_dir)
            history = info["history"]
            loss = f"loss {history[0]:.4g} -> {history[-1]:.4g}" if history else "no history"
            log(f"  {entry.id} ({entry.kind}, {info['arch']}): {'cache hit' if info['cache_hit'] else 'trained'}, "
                f"{loss}, {info['path']}")
            infos[entry.id] = info
    log(stages.report())
    return infos


def train_fleet(spec: AuditSpec, log: Callable[[str], None] = print) -> None:
    """The built-in classifiers of an audit spec, trained now so the audit only reads the cache."""
    stages = Stages(log)
    with stages.stage("train fleet"):
        for entry in spec.fleet:
            if entry.train is not None:
                resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, log=log)
    log(stages.report())


def train_from_file(path: str | Path, log: Callable[[str], None] = print) -> None:
    """A train spec (top-level `models`) or an audit spec (top-level `fleet`: its built-in models)."""
    try:
        top = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    except yaml.YAMLError:
        top = None  # load_spec reports the syntax error with its position
    if isinstance(top, dict) and "fleet" in top:
        train_fleet(load_spec(AuditSpec, path), log)
    else:
        if isinstance(top, dict) and "models" not in top:
            raise SpecError(f"{path}: a train spec needs `models` (or an audit spec with `fleet`)")
        train(load_spec(TrainSpec, path), log)
