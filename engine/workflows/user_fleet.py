"""A team's fleet as it arrives, made from scratch: five models in the formats and conventions users ship, and one
audit spec per dataset that takes them as given (`python -m jobs.user_fleet`).

Images (`shapes`, 3x32x32, circle vs square), each trained here by a plain torch loop as a user would:
- `normalised-cnn`: trained on (x - mean) / std with the training split's per-channel statistics; TorchScript
  (`trust: true`), audited with `input: {mean, std}`.
- `one-logit-cnn`: a binary head with one logit (BCE on P(square)); TorchScript, `output: sigmoid`.
- `onnx-cnn`: a two-class CNN exported with `torch.onnx.export`; `format: onnx`.
Records (`german_credit`, the shipped table's encoded features):
- `gradient-boosting`: scikit-learn's GradientBoostingClassifier saved with skops; `format: sklearn`.
- `lightgbm`: LightGBM's LGBMClassifier saved with skops; `format: sklearn`.
Tree models have no gradients, so the records are explained by `growing_spheres`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from engine.data import load_dataset
from engine.models.architectures import CNNClassifier

IMAGES = {"name": "shapes", "options": {"size": 32, "n_train": 2000, "n_test": 400, "seed": 5}}


def _train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Callable, epochs: int, seed: int,
           predict: Callable[[torch.Tensor], torch.Tensor] = lambda z: z.argmax(1)) -> tuple[nn.Module, float]:
    """A user's own training loop: Adam on shuffled mini-batches for at least `epochs` epochs, and on (up to 4x as
    many) until the training accuracy reaches 0.95: on `shapes` a CNN may sit on a loss plateau for a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    for epoch in range(4 * epochs):
        module.train()
        for idx in torch.randperm(len(x), generator=generator).split(64):
            opt.zero_grad()
            loss(module(x[idx]), y[idx]).backward()
            opt.step()
        module.eval()
        with torch.no_grad():
            accuracy = float((predict(module(x)) == y).float().mean())
        if epoch + 1 >= epochs and accuracy >= 0.95:
            break
    return module, accuracy


class _Normalised(nn.Module):
    """Only for training: the user's preprocessing in front of the network they ship without it."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net, self.mean, self.std = net, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def image_models(directory: Path, epochs: int, log: Callable[[str], Any]) -> list[dict]:
    """Train and save the three image models; return their fleet entries."""
    data = load_dataset(IMAGES["name"], "train", **IMAGES["options"])
    x, y = data.x.float(), data.y.long()
    shape = dict(in_channels=x.shape[1], image_size=x.shape[-1])
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    example = x[:2]

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # users still ship TorchScript
    net = CNNClassifier(**shape, num_classes=2)
    _, accuracy = _train(_Normalised(net, mean, std), x, y, F.cross_entropy, epochs, seed=1)
    torch.jit.save(torch.jit.trace(net.eval(), (example - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)),
                   str(directory / "normalised_cnn.ts"))
    log(f"  normalised-cnn: trained on (x - mean) / std, mean {[round(v, 3) for v in mean.tolist()]}, "
        f"std {[round(v, 3) for v in std.tolist()]}; train accuracy {accuracy:.3f}")

    one, accuracy = _train(CNNClassifier(**shape, num_classes=1), x, y, lambda z, t: F.binary_cross_entropy_with_logits(
        z.squeeze(1), t.float()), epochs, seed=2, predict=lambda z: (z.squeeze(1) > 0).long())
    torch.jit.save(torch.jit.trace(one, example), str(directory / "one_logit_cnn.ts"))
    log(f"  one-logit-cnn: trained with one logit (BCE); train accuracy {accuracy:.3f}")

    exported, accuracy = _train(CNNClassifier(**shape, num_classes=2), x, y, F.cross_entropy, epochs, seed=3)
    torch.onnx.export(exported, (example,), str(directory / "cnn.onnx"), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    log(f"  onnx-cnn: train accuracy {accuracy:.3f}, exported to ONNX")
    return [
        {"id": "normalised-cnn", "path": str(directory / "normalised_cnn.ts"), "trust": True,
         "input": {"mean": mean.tolist(), "std": std.tolist()}},
        {"id": "one-logit-cnn", "path": str(directory / "one_logit_cnn.ts"), "trust": True, "output": "sigmoid"},
        {"id": "onnx-cnn", "path": str(directory / "cnn.onnx"), "format": "onnx"},
    ]


def record_models(directory: Path, log: Callable[[str], Any]) -> list[dict]:
    """Fit and save the two tree ensembles on German credit's encoded records; return their fleet entries."""
    import lightgbm  # deferred: the optional extra `frameworks` (tree ensembles)
    import skops.io
    from sklearn.ensemble import GradientBoostingClassifier

    data = load_dataset("german_credit", "train")
    x, y = data.x.numpy(), data.y.numpy()
    entries = []
    for model_id, model in (("gradient-boosting", GradientBoostingClassifier(random_state=0)),
                            ("lightgbm", lightgbm.LGBMClassifier(n_estimators=100, random_state=0, verbose=-1))):
        model.fit(x, y)
        path = directory / f"{model_id}.skops"
        skops.io.dump(model, str(path))
        log(f"  {model_id}: fitted, train accuracy {model.score(x, y):.3f}")
        entries.append({"id": model_id, "path": str(path), "format": "sklearn", "trust": True})
    return entries


def write_specs(out: str, queries: int = 50, epochs: int = 3, log: Callable[[str], Any] = print) -> list[str]:
    """Build the five models under <out>/models and write <out>/images.yaml and <out>/records.yaml."""
    directory = Path(out) / "models"
    directory.mkdir(parents=True, exist_ok=True)
    common = {"queries": {"count": queries, "seed": 0}, "targets": "flip",
              "metrics": {"fid": {"extractor": "none"}, "bootstrap_samples": 200},
              "runtime": {"batch_size": 25, "num_actors": 1, "num_cpus_per_actor": 1}}
    specs = {
        "images": {"name": "user-images", "output": os.path.join(out, "audit-images"), "dataset": IMAGES,
                   "fleet": image_models(directory, epochs, log),
                   "methods": [{"name": "wachter", "params": {"max_iter": 300}},
                               {"name": "gradual_construction", "params": {"sigma": 50}}], **common},
        "records": {"name": "user-records", "output": os.path.join(out, "audit-records"),
                    "dataset": {"name": "german_credit"}, "fleet": record_models(directory, log),
                    "methods": [{"name": "growing_spheres"}], **common},
    }
    paths = []
    for name, spec in specs.items():
        path = os.path.join(out, f"{name}.yaml")
        with open(path, "w") as fh:
            fh.write(f"# {name}: user-style models taken as given (engine/workflows/user_fleet.py)\n")
            yaml.safe_dump(spec, fh, sort_keys=False)
        paths.append(path)
        log(f"  wrote {path}")
    return paths
