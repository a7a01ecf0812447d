"""Progressive Exaggeration's explainer trained data-parallel on Ray Train (workers > 1).

The loop is engine.models.explainer_training.run_training; here each of Ray Train's TorchTrainer workers runs it on
batch_size / workers samples per step, gradients all-reduced, and rank 0 reports the weights as a checkpoint.
`train_explainer` has the local trainer's signature, so it is what callers pass as get_or_train_explainer's `train`.
"""
from __future__ import annotations

import tempfile
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.data.base import ArrayDataset
from engine.models import explainer_training as local
from engine.models.explainer import Explainer
from engine.models.explainer_training import ExplainerConfig, check_images, run_training
from engine.models.training import seeded
from engine.runtime.cluster import start_ray


def _ray_worker_loop(payload: dict) -> None:
    """TorchTrainer's train_loop_per_worker: the same loop, one shard of every batch, gradients all-reduced."""
    import ray.train  # deferred (here and below): Ray Train's import is slow and only workers > 1 need it
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(payload.get("threads", 1))))
    explainer, history = run_training(
        payload["classifier"], payload["x"], tuple(payload["value_range"]), payload["config"],
        seed=payload["seed"], checkpoint_uri=payload["checkpoint_uri"], checkpoint_every=payload["checkpoint_every"],
        device=ray.train.torch.get_device(), rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
    if ctx.get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"explainer": explainer.state_dict(), "history": history}, f"{tmp}/explainer.pt")
            ray.train.report({"steps": payload["config"].steps},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report({"steps": payload["config"].steps})


def train_explainer(classifier: nn.Module, dataset: ArrayDataset, config: ExplainerConfig, *, seed: int = 0,
                    checkpoint_uri: Optional[str] = None, checkpoint_every: int = 200, workers: int = 1,
                    use_gpu: bool = False, device: Any = "cpu", callback: Optional[Callable[[int, dict], None]] = None,
                    log: Callable[[str], None] = lambda *_: None) -> tuple[Explainer, list[dict]]:
    """Train I_f on `dataset` (its images, value range) for `classifier`: locally, or on Ray Train (workers > 1)."""
    value_range = check_images(dataset)
    if workers <= 1:
        return local.train_explainer(classifier, dataset, config, seed=seed, checkpoint_uri=checkpoint_uri,
                                     checkpoint_every=checkpoint_every, device=device, callback=callback, log=log)
    from ray.train import RunConfig, ScalingConfig  # deferred: Ray Train's import is slow and only workers > 1 need it
    from ray.train.torch import TorchTrainer

    start_ray()
    payload = {"classifier": classifier.cpu(), "x": dataset.x.float(), "value_range": value_range,
               "config": config, "seed": seed, "checkpoint_uri": checkpoint_uri,
               "checkpoint_every": checkpoint_every, "threads": 1}
    trainer = TorchTrainer(_ray_worker_loop, train_loop_config=payload,
                           scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=bool(use_gpu)),
                           run_config=RunConfig(name=f"exaggeration-{seed}",
                                                storage_path=tempfile.mkdtemp(prefix="cfaudit-ray-train-")))
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        state = torch.load(f"{directory}/explainer.pt", map_location="cpu", weights_only=True)
    with seeded(seed):
        explainer = Explainer(dataset.input_shape[0], dataset.input_shape[1], config.num_bins, config.width,
                              config.positive_class, value_range, config.levels, config.skip)
    explainer.load_state_dict(state["explainer"])
    return explainer.eval(), list(state["history"])
