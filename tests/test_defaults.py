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
STUDY = ROOT / "benchmarks" / "results" / "defaults_study"
PAYLOAD = json.loads(defaults.PATH.read_text())


def test_regenerating_from_the_committed_results_gives_the_committed_file(tmp_path):
    text = make_defaults.dumps(make_defaults.build(make_defaults.read_results(STUDY)))
    assert text == defaults.PATH.read_text(), "run `python -m studies.make_defaults`"
    assert make_defaults.main(["--check"]) == 0
    out = tmp_path / "defaults.json"
    assert make_defaults.main(["--out", str(out)]) == 0 and out.read_text() == text
    changed = json.loads(text)
    changed["entries"]["7"]["setting"]["T"] = 0.5
    out.write_text(json.dumps(changed))
    assert make_defaults.main(["--check", "--out", str(out)]) == 1


def test_every_entry_follows_the_rule():
    """Tuned entries are not worse than the published setting on the validate split (median) and
    on any trained model; a published entry is one where neither the pick nor an alternate was."""
    results = make_defaults.read_results(STUDY)
    assert results["validate"] is not None and results["trained"] is not None
    for nfe, entry in load_defaults().items():
        validate = results["validate"]["nfes"][str(nfe)]["settings"]
        trained = results["trained"]["nfes"].get(str(nfe), {"settings": [{"worst": 0.0}] * len(validate)})
        pairs = zip(validate, trained["settings"], strict=True)
        ok = [v["median"] <= 1 and t["worst"] <= 1 for v, t in pairs]
        first = Setting.from_json(validate[0]["setting"])
        if entry["source"] == "published" and first.effective(nfe) != published_setting(nfe).effective(nfe):
            assert not any(ok) and entry["pick"] == "fallback: published", nfe
        elif entry["source"] == "published":  # the search kept the published setting itself
            assert entry["setting"] == published_setting(nfe) and entry["pick"] != "fallback: published", nfe
        else:
            k = ok.index(True)
            assert entry["setting"] == Setting.from_json(validate[k]["setting"]), nfe
            assert entry["pick"].endswith(f"(alternate {k})" if k else "ed"), nfe


def test_a_few_entries_exactly():
    search = json.loads((STUDY / "search.json").read_text())
    for key, rec in search["anchors"].items():
        entry = default_entry(int(key))
        assert entry["scores"]["search"]["J"] == round(rec["scores"]["J"], 4)
        if entry["pick"] == "searched":
            assert entry["setting"] == Setting.from_json(rec["pick"])
    last = max(load_defaults())
    assert default_setting(1000) == default_setting(last)
    e = default_entry(10)
    e["scores"]["validate"][0]["median"] = -1
    assert default_entry(10)["scores"]["validate"][0]["median"] != -1  # entries are copies


def _broken(edit) -> dict:
    payload = copy.deepcopy(PAYLOAD)
    edit(payload)
    return payload


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: p.update(format="psb_fast.defaults/0"), "format"),
    (lambda p: p["entries"].pop("7"), "without gaps"),
    (lambda p: p["entries"].update({"x": {}}), "integers"),
    (lambda p: p["entries"]["7"].update(source="guessed"), "NFE 7: source"),
    (lambda p: p["entries"]["7"].update(stage="mixture"), "NFE 7: stage"),
    (lambda p: p["entries"]["7"].pop("setting"), "NFE 7: .*missing \\['setting'\\]"),
    (lambda p: p["entries"]["7"].update(comment="x"), "NFE 7: .*unknown \\['comment'\\]"),
    (lambda p: p["entries"]["7"]["setting"].update(T=1.2), "NFE 7: setting: T"),
    (lambda p: p["entries"]["7"]["setting"].update(order=5), "NFE 7: setting: order"),
    (lambda p: p["entries"]["7"]["setting"].update(variant="ddim"), "NFE 7: setting: variant"),
    (lambda p: p["entries"]["7"]["setting"].update(fractions=[0.0, 0.5, 1.0]), "NFE 7: setting: fractions"),
    (lambda p: p["entries"]["7"]["setting"].update(fraction=None), "NFE 7: setting: unknown"),
    (lambda p: p["entries"]["7"].update(source="published"), "NFE 7: source 'published'"),
])
def test_a_malformed_defaults_file_is_refused_naming_the_entry_and_field(edit, match):
    with pytest.raises(ValueError, match=match):
        check_defaults(_broken(edit), "defaults.json")


def test_load_defaults_reports_bad_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_defaults(path)


def test_make_defaults_refuses_results_of_other_picks():
    results = make_defaults.read_results(STUDY)
    for stage in ("validate", "trained"):
        changed = copy.deepcopy(results)
        changed[stage]["nfes"]["7"]["settings"][0]["setting"] = Setting(0.5, 2.0, 2).to_json()
        with pytest.raises(ValueError, match=f"rerun `python -m studies.defaults_study {stage}`"):
            make_defaults.build(changed)


def test_the_wheel_holds_the_defaults_file_and_not_the_studies():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = ["psb_fast", "psb_fast.ops", "psb_fast.kernels", "psb_fast.reference", "psb_fast.benchmarks"]
    assert setuptools["packages"] == packages
    assert "defaults.json" in setuptools["package-data"]["psb_fast"]
    benchmarks = ROOT / "benchmarks"
    assert not list(benchmarks.glob("*study*.py")) and not list(benchmarks.glob("tuning_*.py"))
    assert not (ROOT / "psb_fast" / "tuned_defaults.py").exists()
    assert not list((ROOT / "studies").glob("tuning_*.py"))  # the earlier studies are gone
