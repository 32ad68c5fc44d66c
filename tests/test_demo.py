"""The demo's comparison (defaults, grid-tuned, learned, published) with distribution metrics, and
the tune report's distribution table."""

import dataclasses
import json

import pytest
import torch

from psb_fast.cli import _tune_quality, main
from psb_fast.demo import COLUMNS, format_table, run_demo
from psb_fast.pretrained import load_trained

torch.set_num_threads(1)

ROW_KEYS = {"nfe", "settings", "kept", "T", "order", "grid", "variant", "rmse_vs_reference", "sw2_to_data",
            "mmd_to_data", "energy_distance_to_data", "sample_seconds"}


def _metrics(rows: list[dict], learn: dict | None) -> dict:
    return {"train_steps": 10, "train_seconds_this_call": 1.0, "tune_seconds": 2.0, "tune_samples": 64,
            "samples": 64, "held_out_points": 64, "total_seconds_this_call": 3.0, "learn": learn,
            "machine": {"threads": 1}, "data_vs_data": {"sw2": 0.05, "mmd": 0.01, "energy": 0.001},
            "rows": rows}


def test_table_has_a_column_per_metric_and_marks_the_kept_setting():
    row = {"nfe": 5, "T": 0.7, "order": 1, "variant": "multistep-corrector", "rmse_vs_reference": 0.01,
           "sw2_to_data": 0.0612, "mmd_to_data": 0.0123, "energy_distance_to_data": 0.0021,
           "sample_seconds": 0.1}
    rows = [dict(row, settings=name, kept={"tuned": False, "learned": True}.get(name)) for name in COLUMNS]
    learn = {5: {"kept": "learned", "learned_rmse": 0.008, "ratio_to_grid": 0.8, "z": -3.0, "note": ""}}
    table = format_table(_metrics(rows, learn))
    header = next(line for line in table.splitlines() if line.lstrip().startswith("NFE"))
    assert header.split() == ["NFE", "settings", "variant", "T", "order", "RMSE", "vs", "ref", "SW2", "MMD",
                              "energy", "sample", "s"]
    assert "learned*" in table and "tuned*" not in table and "0.0612" in table and "0.0123" in table
    assert "data vs data" in table and "SW2 0.0500, MMD 0.0100" in table and "kept learned" in table
    plain = format_table(_metrics([dict(row, settings="tuned", kept=True)], None))
    assert "tuned*" in plain and "grid search)" in plain


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, steps=30, progress=False, samples=64)


@pytest.mark.slow
def test_demo_compares_four_settings_with_distribution_metrics(demo, capsys):
    out, metrics = demo
    names = {r["settings"] for r in metrics["rows"]}
    assert {"defaults", "tuned", "published"} <= names <= set(COLUMNS)
    assert all(set(r) == ROW_KEYS for r in metrics["rows"])
    tuned = json.loads((out / "tuned.json").read_text())["settings"]
    for nfe in (5, 10, 20):
        rows = {r["settings"]: r for r in metrics["rows"] if r["nfe"] == nfe}
        info = metrics["learn"][nfe]
        assert info["kept"] == tuned[str(nfe)]["learn"]["kept"]
        kept = "learned" if info["kept"] == "learned" else "tuned"
        assert rows[kept]["kept"] is True and rows["defaults"]["kept"] is None
        assert ("learned" in rows) == (info["learned_rmse"] is not None)
        assert rows[kept]["T"] == pytest.approx(tuned[str(nfe)]["T"])  # tuned.json holds the kept one
        for r in rows.values():
            assert r["sw2_to_data"] > 0 and r["mmd_to_data"] > 0 and r["energy_distance_to_data"] > 0
    floor = metrics["data_vs_data"]
    assert floor["sw2"] > 0 and floor["mmd"] > 0 and metrics["mmd_bandwidth"] > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"] == metrics["rows"] and saved["total_seconds_this_call"] > 0
    assert (out / "samples.png").stat().st_size > 1000


@pytest.mark.slow
def test_tune_reports_distribution_quality_beside_the_error(demo, capsys):
    out, _ = demo
    assert main(["tune", str(out / "run"), "-n", "64", "--nfe", "5", "--no-refine", "--no-progress",
                 "--out", str(out / "t.json")]) == 0
    text = capsys.readouterr().out
    assert "distribution quality on 64 fresh prior draws" in text and "data vs data" in text
    lines = [line.split() for line in text.splitlines() if line.split()[:1] == ["5"]]
    assert [line[1].rstrip("*") for line in lines[1:]] == ["defaults", "tuned", "published"]
    assert all(float(v) > 0 for line in lines[1:] for v in line[2:])
    trained = load_trained(out / "run")
    own = dataclasses.replace(trained, config=dataclasses.replace(trained.config, data="tensor:own.npy"))
    _tune_quality(own, {}, 64, 3, torch.device("cpu"))
    said = capsys.readouterr().out
    assert said == "distribution quality: not measured ('tensor:own.npy' has no held-out split)\n"
    moved = dataclasses.replace(trained, config=dataclasses.replace(trained.config, data="cifar10:/no/such"))
    _tune_quality(moved, {}, 64, 3, torch.device("cpu"))
    said = capsys.readouterr().out
    assert said.startswith("distribution quality: not measured (the run's data 'cifar10:/no/such' did not "
                           "load: ") and said.count("\n") == 1
