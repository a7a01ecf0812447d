"""train(spec): train, or fetch from the content-addressed cache, every built-in model a spec names."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from engine.data import dataset_fingerprint, load_dataset
from engine.models.explainer_training import RUN_OPTIONS, get_or_train_explainer, make_explainer_config
from engine.models.zoo import get_or_train
from engine.runtime.explainer_train import train_explainer
from engine.runtime.fleet import resolve_classifier, resolve_explainer
from engine.spec import AuditSpec, SpecError, load_spec
from engine.spec.loading import read_yaml
from engine.spec.train import DEFAULT_ARCH, TrainSpec
from engine.workflows.stages import Stages


def train(spec: TrainSpec, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Returns model id -> the zoo's info (key, cache_hit, path, seconds, history, ...)."""
    stages = Stages(log)
    infos: dict[str, dict] = {}
    modules: dict[str, object] = {}
    for entry in spec.models:
        with stages.stage(f"train {entry.id}"):
            data = load_dataset(spec.dataset.name, "train", **{**spec.dataset.options, **entry.dataset_options})
            if entry.kind == "exaggeration":
                infos[entry.id] = _train_explainer(entry, modules[entry.classifier], data, spec.cache_dir, log)
                continue
            module, info = get_or_train(entry.kind, entry.arch or DEFAULT_ARCH[entry.kind], entry.arch_options,
                                        data, dataset_fingerprint(data), entry.train_kwargs(), entry.seed,
                                        spec.cache_dir, log=log, stage=entry.id)
            modules[entry.id] = module
            history = info["history"]
            loss = f"loss {history[0]:.4g} -> {history[-1]:.4g}" if history else "no history"
            log(f"  {entry.id} ({entry.kind}, {info['arch']}): {'cache hit' if info['cache_hit'] else 'trained'}, "
                f"{loss}, {info['path']}")
            infos[entry.id] = info
    log(stages.report())
    return infos


def _train_explainer(entry, classifier, data, cache_dir, log: Callable[[str], None]) -> dict:
    """A train spec's `exaggeration` entry: the explainer of an earlier classifier entry."""
    run = {k: v for k, v in entry.train_kwargs().items() if k in RUN_OPTIONS}
    config = make_explainer_config(entry.train_kwargs_without(RUN_OPTIONS))
    _, info = get_or_train_explainer(classifier, data, dataset_fingerprint(data), config, seed=entry.seed,
                                     cache_dir=cache_dir, log=log, train=train_explainer, **run)
    history = info["history"]
    loss = (f"rec {history[0]['rec']:.4g} -> {history[-1]['rec']:.4g}, kl {history[0]['kl']:.4g} -> "
            f"{history[-1]['kl']:.4g}") if history else "no history"
    log(f"  {entry.id} (exaggeration for {entry.classifier}): {'cache hit' if info['cache_hit'] else 'trained'}, "
        f"{loss}, {info['path']}")
    return info


def train_fleet(spec: AuditSpec, log: Callable[[str], None] = print) -> None:
    """The built-in classifiers of an audit spec (and their explainers), trained now so the audit only reads
    the cache."""
    stages = Stages(log)
    explainer = spec.explainer_entry()
    with stages.stage("train fleet"):
        for entry in spec.fleet:
            if entry.train is not None or explainer is not None:
                handle = resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, log=log)
                if explainer is not None:
                    resolve_explainer(handle, explainer, spec.dataset, spec.runtime.cache_dir,
                                      checkpoint_root=spec.output, log=log)
    log(stages.report())


def train_from_file(path: str | Path, log: Callable[[str], None] = print) -> None:
    """A train spec (top-level `models`) or an audit spec (top-level `fleet`: its built-in models)."""
    try:
        top = read_yaml(Path(path).read_text(), str(path)) if Path(path).is_file() else None
    except SpecError:
        top = None  # load_spec reports the syntax error or alias with its position
    if isinstance(top, dict) and "fleet" in top:
        train_fleet(load_spec(AuditSpec, path), log)
    else:
        if isinstance(top, dict) and "models" not in top:
            raise SpecError(f"{path}: a train spec needs `models` (or an audit spec with `fleet`)")
        train(load_spec(TrainSpec, path), log)
