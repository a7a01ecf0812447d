import pytest
import torch

from engine.targets import resolve_targets

LOGITS = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 5.0]])


def test_second_and_explicit():
    rows, target = resolve_targets(LOGITS, "second")
    assert rows.tolist() == [0, 1] and target.tolist() == [1, 1]
    rows, target = resolve_targets(LOGITS, 2)
    assert target.tolist() == [2, 2]


def test_all_expands_every_other_class():
    rows, target = resolve_targets(LOGITS, "all")
    assert rows.tolist() == [0, 0, 1, 1]
    assert target.tolist() == [1, 2, 0, 1]


def test_flip_is_binary_only():
    rows, target = resolve_targets(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "flip")
    assert target.tolist() == [1, 0]
    with pytest.raises(ValueError, match="binary"):
        resolve_targets(LOGITS, "flip")


def test_out_of_range_target():
    with pytest.raises(ValueError, match="class 3 is out of range.*3 classes"):
        resolve_targets(LOGITS, 3)
