import json

import pyarrow.parquet as pq
import pytest
import torch

from engine.data import load_dataset
from jobs.bench_dice import bench_dice, encode_records, judge


@pytest.fixture(scope="module")
def credit():
    return load_dataset("german_credit", "test")


def test_cfaudit_side_runs_without_dice_and_writes_the_table(tmp_path):
    rows = bench_dice(queries=4, peers=(), repeats=1, out=str(tmp_path), command="test", log=lambda _: None)
    assert [r.method for r in rows] == ["cfaudit:gradual_construction", "cfaudit:wachter", "cfaudit:growing_spheres"]
    for r in rows:
        assert r.queries == 4 and r.s_per_cf > 0 and 0.0 <= r.validity <= 1.0
        # cfaudit's counterfactuals are valid records already: projection is a no-op, immutables untouched
        assert r.record_ok == 1.0 and r.validity == r.validity_raw
        assert r.immutable_changed == 0 and r.direction_violated == 0
    gc, wachter, _ = rows
    assert gc.ratio_vs_gc == pytest.approx(1.0) and wachter.ratio_vs_wachter == pytest.approx(1.0)
    table = pq.read_table(tmp_path / "bench" / "dice.parquet")
    assert table.column("method").to_pylist() == [r.method for r in rows]
    meta = json.loads(table.schema.metadata[b"cfaudit.bench"])
    assert meta["command"] == "test" and meta["versions"]["torch"] == torch.__version__
    assert (tmp_path / "bench" / "dice.json").exists()


def test_without_dice_ml_the_dice_rows_are_skipped_with_a_note(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dice_ml" else find_spec(name, *a))
    lines = []
    rows = bench_dice(queries=2, peers=("random",), repeats=1, out=None, log=lines.append)
    assert [r.method for r in rows][-1] == "cfaudit:growing_spheres"
    assert any("dice-ml is not installed" in line and "dice:random" in line for line in lines)


def test_unknown_peer_is_a_value_error():
    with pytest.raises(ValueError, match="Expected `peers` among"):
        bench_dice(queries=2, peers=("genetic",), out=None, log=lambda _: None)


def test_judge_projects_records_and_reports_what_the_method_broke(credit):
    schema, x0 = credit.schema, credit.x[:3]
    records = schema.decode(x0)
    records[0] = {**records[0], "duration": records[0]["duration"] + 0.4, "personal_status": "male_divorced"
                  if records[0]["personal_status"] != "male_divorced" else "male_single"}
    records[1] = {**records[1], "age": records[1]["age"] - 5}  # age may only increase
    records[2] = None  # nothing returned
    raw = encode_records(schema, records, x0)
    assert raw[2].equal(x0[2])

    class Const(torch.nn.Module):  # predicts class 1 for everything
        def forward(self, x):
            return torch.stack([torch.zeros(len(x)), torch.ones(len(x))], 1)

    from engine.models.handles import ClassifierHandle

    handle = ClassifierHandle(_with_param(Const()), "const", (57,), ["bad", "good"])
    judged = judge(schema, handle, x0, torch.ones(3, dtype=torch.long), records)
    assert judged.returned.tolist() == [True, True, False]
    assert judged.valid.tolist() == [True, True, False]  # judged on the projected record
    assert judged.record_ok.tolist() == [False, False, False]  # both needed repair
    assert judged.immutable_changed.tolist() == [True, False, False]
    assert judged.direction_violated.tolist() == [False, True, False]
    assert judged.l0[:2].tolist() == [0, 0]  # after projection nothing of the original is changed


def _with_param(module):
    module.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # judge reads the model's device
    return module


def test_dice_layout_maps_onto_cfaudit_encoding(credit):
    dice_ml = pytest.importorskip("dice_ml", reason="DiCE is optional: pip install -e '.[dice]'")
    from jobs.dice_peer import DiceLayoutModel, OUTCOME, check_layout, dice_frame, layout_map

    reference = load_dataset("german_credit", "train")
    schema = credit.schema
    train_df = dice_frame(schema, reference.x)
    train_df[OUTCOME] = reference.y.numpy()
    numeric = [f.name for f in schema.features if f.type != "categorical"]
    data = dice_ml.Data(dataframe=train_df, continuous_features=numeric, outcome_name=OUTCOME)
    columns = list(data.get_ohe_min_max_normalized_data(train_df.iloc[[0]][data.feature_names]).columns)
    weight, bias = layout_map(schema, columns, train_df[numeric].min().to_dict(), train_df[numeric].max().to_dict())
    # The affine map alone reproduces cfaudit's encoding of the same rows, column for column.
    frame = dice_frame(schema, credit.x[:40])
    encoded = torch.tensor(data.get_ohe_min_max_normalized_data(frame).to_numpy(float)).float()
    assert torch.allclose(encoded @ weight.float() + bias.float(), credit.x[:40], atol=1e-5)

    from engine.models.handles import ClassifierHandle

    mlp = torch.nn.Sequential(torch.nn.Linear(57, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    handle = ClassifierHandle(mlp, "mlp", (57,), ["bad", "good"])
    check_layout(data, DiceLayoutModel(mlp, weight, bias), handle, frame, credit.x[:40])
    one = DiceLayoutModel(mlp, weight, bias)(encoded[0])  # DiCE's gradient method feeds single rows
    assert one.shape == (2,) and one.sum().item() == pytest.approx(1.0)


def test_dice_random_runs_beside_cfaudit_on_the_same_queries(tmp_path):
    pytest.importorskip("dice_ml", reason="DiCE is optional: pip install -e '.[dice]'")
    rows = bench_dice(queries=3, peers=("random",), repeats=1, out=str(tmp_path), log=lambda _: None)
    assert [r.method for r in rows] == ["cfaudit:gradual_construction", "cfaudit:wachter", "cfaudit:growing_spheres",
                                        "dice:random"]
    dice = rows[-1]
    assert dice.queries == 3 and dice.s_per_cf > 0 and 0.0 <= dice.validity <= dice.returned
    assert dice.immutable_changed == 0  # features_to_vary leaves the immutables out
    assert dice.ratio_vs_gc == pytest.approx(dice.s_per_cf / rows[0].s_per_cf)
    meta = json.loads(pq.read_table(tmp_path / "bench" / "dice.parquet").schema.metadata[b"cfaudit.bench"])
    assert meta["versions"]["dice-ml"] and "personal_status" not in meta["dice"]["features_to_vary"]
