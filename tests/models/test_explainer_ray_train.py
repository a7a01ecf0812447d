"""The Ray Train path of Progressive Exaggeration's training (workers > 1): a tiny 2-worker run on loopback Ray."""
from __future__ import annotations

import torch

from engine.data.base import ArrayDataset
from engine.models.explainer import Explainer
from engine.models.explainer_training import ExplainerConfig, classifier_fingerprint, load_checkpoint
from engine.runtime.explainer_train import train_explainer
from tests.models.test_explainer import TinyClassifier

TINY = ExplainerConfig(steps=4, batch_size=8, width=4, d_steps=1, num_bins=4)


def test_two_workers_write_a_checkpoint_that_resumes_and_loads(local_ray, tmp_path) -> None:
    x = torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = ArrayDataset("tiny", x, torch.zeros(48, dtype=torch.int64), ["a", "b"], "image")
    classifier = TinyClassifier().eval()
    before = classifier_fingerprint(classifier)
    uri = str(tmp_path / "ckpt")
    explainer, history = train_explainer(classifier, data, TINY, seed=2, checkpoint_uri=uri, checkpoint_every=2,
                                         workers=2)
    assert classifier_fingerprint(classifier) == before  # f is only queried, never trained
    ckpt = load_checkpoint(uri)
    assert ckpt["step"] == TINY.steps and ckpt["history"] == history and history[-1]["step"] == TINY.steps
    # the returned weights (rank 0, reported through Ray Train) are those of the checkpoint
    for name, t in explainer.state_dict().items():
        assert torch.equal(t, ckpt["explainer"][name]), name
    loaded = Explainer(**{**explainer.hparams, "value_range": tuple(explainer.hparams["value_range"])})
    loaded.load_state_dict(ckpt["explainer"])
    loaded.eval()
    c = torch.tensor([0, 3, 1])
    with torch.no_grad():
        out = loaded(x[:3], c)
        torch.testing.assert_close(out, explainer(x[:3], c))
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    # The checkpoint holds the whole training state: a run on it (here the local path) resumes at its last step,
    # runs no step again and returns the same weights.
    steps: list[int] = []
    again, history2 = train_explainer(classifier, data, TINY, seed=2, checkpoint_uri=uri,
                                      callback=lambda step, _: steps.append(step))
    assert steps == [] and history2 == history
    for name, t in again.state_dict().items():
        assert torch.equal(t, explainer.state_dict()[name]), name
