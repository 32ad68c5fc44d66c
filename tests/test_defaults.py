"""The defaults are data: psb_fast/defaults.json, its loader (psb_fast.defaults) and the one command
that writes it from the studies' results (`python -m studies.make_defaults`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from psb_fast import defaults
from psb_fast.defaults import check_defaults, default_entry, default_setting, load_defaults
from psb_fast.settings import Setting, published_setting
from studies import make_defaults

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAYLOAD = json.loads(defaults.PATH.read_text())


def test_regenerating_from_the_committed_results_gives_the_committed_file(tmp_path):
    text = make_defaults.dumps(make_defaults.build(make_defaults.read_results(RESULTS)))
    assert text == defaults.PATH.read_text(), "run `python -m studies.make_defaults`"
    assert make_defaults.main(["--check"]) == 0
    out = tmp_path / "defaults.json"
    assert make_defaults.main(["--out", str(out)]) == 0 and out.read_text() == text
    out.write_text(text.replace('"T": 0.60812', '"T": 0.6'))
    assert make_defaults.main(["--check", "--out", str(out)]) == 1


def test_defaults_are_the_final_table_of_the_held_out_check():
    """tuning.json's table (written by `tuning_study --evaluate-only` from the defaults as they were
    before they became data) lists every default NFE 1..50 with the stage that set it."""
    table = json.loads((RESULTS / "tuning.json").read_text())["table"]
    assert sorted(int(n) for n in table) == list(range(1, 51)) == sorted(load_defaults())
    for key, rec in table.items():
        nfe = int(key)
        entry = default_entry(nfe)
        assert entry["setting"] == Setting(rec["T"], rec["q"], rec["order"], rec.get("fractions")), nfe
        assert entry["stage"] == {"joint": "joint", "trained": "trained"}.get(rec["source"], "mixture"), nfe


def test_a_few_entries_exactly():
    assert default_setting(1) == default_setting(2) == Setting(0.36346, 2.125, 0)
    assert default_setting(5) == Setting(0.60812, 1.375, 2, (0.0, 0.29235, 0.61546, 0.85482, 1.0))
    assert default_setting(16) == published_setting(16) and default_setting(16).T == 0.8200000000000001
    assert PAYLOAD["entries"]["16"]["setting"]["T"] == 0.82  # stored rounded; the loader uses published_T
    assert default_setting(47) == Setting(0.92426, 1.5, 3)
    assert default_setting(50) == Setting(0.9, 2.0, 2) == default_setting(1000)
    e = default_entry(20)
    assert (e["source"], e["stage"], e["pick"]) == ("tuned", "joint", "searched")
    assert set(e["scores"]["joint"]["ratios"]) == set(PAYLOAD["stages"]["joint"]["problems"])
    e = default_entry(30)
    assert (e["source"], e["stage"], e["pick"], e["scores"]["trained"]["kept"]) == ("published", "trained",
                                                                                    "published", False)
    assert max(e["scores"]["trained"]["rejected_ratios"].values()) > 1  # why the searched entry lost
    assert default_entry(3)["scores"]["trained"]["kept"] and default_entry(9)["pick"] == "interpolated"
    e["scores"]["trained"]["kept"] = True
    assert default_entry(30)["scores"]["trained"]["kept"] is False  # entries are copies


def _broken(edit) -> dict:
    payload = copy.deepcopy(PAYLOAD)
    edit(payload)
    return payload


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: p.update(format="psb_fast.defaults/0"), "format"),
    (lambda p: p["entries"].pop("7"), "without gaps"),
    (lambda p: p["entries"].update({"x": {}}), "integers"),
    (lambda p: p["entries"]["7"].update(source="guessed"), "NFE 7: source"),
    (lambda p: p["entries"]["7"].update(stage="oracle"), "NFE 7: stage"),
    (lambda p: p["entries"]["7"].pop("setting"), "NFE 7: .*missing \\['setting'\\]"),
    (lambda p: p["entries"]["7"].update(comment="x"), "NFE 7: .*unknown \\['comment'\\]"),
    (lambda p: p["entries"]["7"]["setting"].update(T=1.2), "NFE 7: setting: T"),
    (lambda p: p["entries"]["7"]["setting"].update(order=5), "NFE 7: setting: order"),
    (lambda p: p["entries"]["7"]["setting"].update(variant="ddim"), "NFE 7: setting: variant"),
    (lambda p: p["entries"]["7"]["setting"].update(fractions=[0.0, 0.5, 1.0]), "NFE 7: setting: fractions"),
    (lambda p: p["entries"]["7"]["setting"].update(fraction=None), "NFE 7: setting: unknown"),
    (lambda p: p["entries"]["30"]["setting"].update(T=0.91), "NFE 30: source 'published'"),
])
def test_a_malformed_defaults_file_is_refused_naming_the_entry_and_field(edit, match):
    with pytest.raises(ValueError, match=match):
        check_defaults(_broken(edit), "defaults.json")


def test_load_defaults_reports_bad_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_defaults(path)


def test_make_defaults_refuses_a_trained_check_of_other_picks():
    results = make_defaults.read_results(RESULTS)
    results["trained"] = copy.deepcopy(results["trained"])
    results["trained"]["table"]["7"]["candidates"]["tuned"]["setting"] = [0.5, 2.0, 2]
    with pytest.raises(ValueError, match="rerun"):
        make_defaults.compose(results)
    before = make_defaults.compose(make_defaults.read_results(RESULTS), stages=("mixture", "trained"))
    assert before[5]["stage"] == "mixture" and before[20]["stage"] == "trained"  # before the joint search


def test_the_wheel_holds_the_defaults_file_and_not_the_studies():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = ["psb_fast", "psb_fast.kernels", "psb_fast.reference", "psb_fast.benchmarks"]
    assert setuptools["packages"] == packages
    assert "defaults.json" in setuptools["package-data"]["psb_fast"]
    benchmarks = ROOT / "benchmarks"
    assert not list(benchmarks.glob("*study*.py")) and not list(benchmarks.glob("tuning_*.py"))
    assert not (ROOT / "psb_fast" / "tuned_defaults.py").exists()
