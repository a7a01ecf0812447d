import numpy as np
import pytest
import torch

from engine.data.base import ArrayDataset
from engine.metrics.fid_reference import reference_state
from engine.metrics.frechet import FrechetState
from engine.models import zoo
from engine.models.explainer_training import make_explainer_config, run_training
from engine.progress import Progress, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(total: int, seconds_per_step: float, **kwargs) -> list[str]:
    clock, lines = Clock(), []
    progress = Progress("cnn", lines.append, total, clock=clock, **kwargs)
    for i in range(total):
        clock.now += seconds_per_step
        progress.update(loss=1.0 / (i + 1))
    progress.close()
    return lines


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (41, "41 s"), (95, "1 min 35 s"), (292, "4 min 52 s"),
                                           (3900, "1 h 05 min")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_throttles_to_one_line_per_interval_plus_the_last():
    lines = run(100, 0.5, every_s=5.0)  # 50 s in all: a line every 10 steps at most, and the last
    assert 5 <= len(lines) <= 11
    assert lines[-1].startswith("  cnn: step 100/100, loss 0.01, 50 s")
    assert "ETA" not in lines[-1]


def test_a_short_loop_prints_only_its_last_line():
    assert run(20, 0.01) == ["  cnn: step 20/20, loss 0.05, 0 s"]


def test_eta_from_the_pace_so_far():
    clock, lines = Clock(), []
    progress = Progress("attribute_autoencoder", lines.append, 40, epochs=4, clock=clock, every_s=5.0)
    clock.now += 6.0
    progress.update(12, loss=0.0421)  # 12 of 40 steps in 6 s: 28 left at 0.5 s each
    assert lines == ["  attribute_autoencoder: epoch 2/4, step 2/10, loss 0.0421, 6 s, ETA 14 s"]


def test_epoch_boundaries_read_full_epochs():
    clock, lines = Clock(), []
    progress = Progress("m", lines.append, 30, epochs=3, clock=clock)
    progress.update(10)
    assert progress.line().startswith("  m: epoch 1/3, step 10/10")
    progress.update(1)
    assert progress.line().startswith("  m: epoch 2/3, step 1/10")


def test_lines_thin_out_on_long_stages():
    lines = run(4000, 1.0, every_s=5.0)  # ~67 min: every 5 s would be 800 lines
    assert len(lines) < 120


def test_resumed_loop_counts_only_this_runs_pace():
    clock, lines = Clock(), []
    progress = Progress("explainer", lines.append, 100, done=50, clock=clock)
    clock.now += 10.0
    progress.update(10)  # 10 steps in 10 s, 40 left
    assert lines == ["  explainer: step 60/100, 10 s, ETA 40 s"]


def test_no_log_prints_nothing_and_plain_lines_off_a_terminal(capsys):
    progress = Progress("quiet", None, 10, bar=True)
    for _ in range(10):
        progress.update()
    progress.close()
    lines = []
    progress = Progress("explain", lines.append, 10, unit="queries", bar=True)  # pytest's stderr is no tty
    progress.update(10, units="2/2", failed=0)
    progress.close()
    progress.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert len(lines) == 1 and lines[0].startswith("  explain: queries 10/10, units 2/2, failed 0, ")
    assert "\r" not in lines[0]



def test_on_a_terminal_the_bar_is_tqdm(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    lines: list[str] = []
    progress = Progress("explain", lines.append, 4, unit="queries", bar=True)
    progress.update(4, units="1/1")
    progress.close()
    assert lines == [] and "explain: 100%" in capsys.readouterr().err


# ---- progress only observes: the trainers, the explainer and the FID reference give the same bits --------------

def _images(n: int = 96, size: int = 16) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=g)
    y = (x[:, 0, :8].mean((1, 2)) > x[:, 0, 8:].mean((1, 2))).long()
    return ArrayDataset("toy", x, y, ["bottom", "top"], "image", attributes=y[:, None].float(),
                        attribute_names=["top"])


TRAINERS = {  # kind, arch, arch kwargs, train kwargs
    "classifier": ("classifier", "cnn", dict(in_channels=1, image_size=16, num_classes=2), dict(epochs=2)),
    "vae": ("vae", "conv_vae", dict(in_channels=1, image_size=16, latent_dim=4), dict(epochs=2)),
    "dcgan": ("dcgan", "dcgan_generator", dict(out_channels=1, image_size=16, latent_dim=4), dict(epochs=1)),
    "attribute_autoencoder": ("attribute_autoencoder", "attribute_autoencoder",
                              dict(in_channels=1, image_size=16, latent_dim=4, num_attributes=1),
                              dict(epochs=2, oracle_epochs=1)),
}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_training_with_progress_is_bit_identical(name, tmp_path):
    kind, arch, arch_kwargs, train_kwargs = TRAINERS[name]
    data = _images()
    runs = []
    for log in (None, []):
        info_log = None if log is None else log.append
        module, info = zoo.get_or_train(kind, arch, arch_kwargs, data, "toy-fp", train_kwargs, seed=3,
                                        cache_dir=tmp_path / ("quiet" if log is None else "loud"), log=info_log,
                                        stage=f"toy {name}")
        runs.append((module.state_dict(), info, log))
    (quiet_state, quiet_info, _), (loud_state, loud_info, lines) = runs
    assert quiet_info["key"] == loud_info["key"]  # the log and the stage name are not in the cache key
    assert "log" not in loud_info["train_kwargs"] and "stage" not in loud_info["train_kwargs"]
    assert quiet_info["history"] == loud_info["history"]
    assert all(torch.equal(quiet_state[k], loud_state[k]) for k in quiet_state)
    assert lines and lines[-1].startswith(f"  toy {name}: epoch {train_kwargs['epochs']}/{train_kwargs['epochs']}")


def test_explainer_training_with_progress_is_bit_identical():
    data = _images(64)
    classifier, _ = zoo.get_or_train("classifier", "cnn", dict(in_channels=1, image_size=16, num_classes=2), data,
                                     "toy-fp", {"epochs": 1}, seed=0, cache_dir=None)
    config = make_explainer_config({"steps": 4, "width": 4, "batch_size": 8, "d_steps": 2})
    quiet, quiet_history = run_training(classifier, data.x, (0.0, 1.0), config, seed=1)
    lines: list[str] = []
    loud, loud_history = run_training(classifier, data.x, (0.0, 1.0), config, seed=1, log=lines.append)
    assert quiet_history == loud_history
    assert all(torch.equal(a, b) for a, b in zip(quiet.state_dict().values(), loud.state_dict().values()))
    assert len(lines) == 1 and lines[0].startswith("  explainer: step 4/4, d ")


def test_fid_reference_in_chunks_equals_one_pass():
    class Extractor:
        batch_size = 7

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)

    x = _images(50).x
    lines: list[str] = []
    chunked = reference_state(Extractor(), x, 40, seed=5, log=lines.append)
    index = torch.randperm(50, generator=torch.Generator().manual_seed(5))[:40]
    whole = FrechetState.of(Extractor()(x[index]).double().numpy())
    for a, b in zip(chunked.to_arrays(), whole.to_arrays()):
        assert np.array_equal(a, b)
    assert lines and lines[-1].startswith("  FID reference: images 40/40, ")
