"""The defaults are one rule stored as data: psb_fast/defaults.json, its loader (psb_fast.defaults),
the one command that writes it from the studies' results (`python -m studies.make_defaults`), and
the rule's promise: more evaluations never give a clearly worse sample."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from psb_fast import defaults
from psb_fast.bridge import PhaseBridge
from psb_fast.defaults import check_defaults, default_entry, default_setting, load_defaults, rule_setting
from psb_fast.oracles import mixture_2d_grid, mixture_2d_ring, ode_solution
from psb_fast.settings import T_END, VARIANTS, Setting
from psb_fast.tuning import run_settings
from studies import make_defaults
from studies.defaults_study import MAX_J_LOSS, NEVER, final_rule, monotonicity

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "results" / "defaults_study"
PAYLOAD = json.loads(defaults.PATH.read_text())
#: The NFEs of the monotonicity check: every NFE 1..30, then every second one to 50.
CHECK_NFES = tuple(range(1, 31)) + tuple(range(32, 51, 2))
TRAINED_MAX_NFE = 12


def test_regenerating_from_the_committed_results_gives_the_committed_file(tmp_path):
    text = make_defaults.dumps(make_defaults.build(make_defaults.read_results(STUDY)))
    assert text == defaults.PATH.read_text(), "run `python -m studies.make_defaults`"
    assert make_defaults.main(["--check"]) == 0
    out = tmp_path / "defaults.json"
    assert make_defaults.main(["--out", str(out)]) == 0 and out.read_text() == text
    changed = json.loads(text)
    changed["rule"]["tau"]["a"] *= 1.1
    out.write_text(json.dumps(changed))
    assert make_defaults.main(["--check", "--out", str(out)]) == 1


def test_the_rule_is_smooth_and_defined_for_every_nfe():
    """T non-decreasing, one grid power and one variant, the order non-decreasing and never above
    what the NFE can use, for every NFE 1..1000."""
    settings = [default_setting(n) for n in range(1, 1001)]
    assert {s.variant for s in settings} == {PAYLOAD["rule"]["variant"]}
    assert {s.q for s in settings} == {float(PAYLOAD["rule"]["q"])}
    for nfe, (a, b) in enumerate(zip(settings, settings[1:], strict=False), start=1):
        assert b.T >= a.T and b.order >= a.order, nfe
        assert 0 < a.T < 1 and a.fractions is None and a.order <= max(nfe - 2, 0)
    tau = PAYLOAD["rule"]["tau"]
    assert 1 - default_setting(10).T == pytest.approx(
        min(max(tau["a"] * 10 ** -tau["b"], tau["min"]), tau["max"]), abs=1e-6)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nfe must be an int"):
            default_setting(bad)


def test_the_rule_is_the_fitted_one_and_entries_are_copies():
    """The file's rule is the fit's, with the order steps the `orders` stage moved."""
    fit = json.loads((STUDY / "fit.json").read_text())
    assert PAYLOAD["rule"] == final_rule(STUDY)
    assert {k: v for k, v in PAYLOAD["rule"].items() if k != "order"} == {
        k: v for k, v in fit["rule"].items() if k != "order"}
    entry = default_entry(10)
    assert entry["nfe"] == 10 and entry["setting"] == default_setting(10) and entry["source"] == "rule"
    assert entry["pick"] == defaults.describe_rule(PAYLOAD["rule"])
    assert entry["scores"]["validate"] == PAYLOAD["scores"]["validate"]["10"]
    entry["scores"]["validate"]["median"] = -1
    assert default_entry(10)["scores"]["validate"]["median"] != -1  # entries are copies


def test_the_order_steps_are_the_orders_stage_choice():
    """The file's order steps are the `orders` stage's: per step the start (or none) with the fewest
    rises at the step on the choice set among those within MAX_J_LOSS of the fit's J; no order 3,
    whose step raised the error on 3-10 tune problems at every start tried (orders.md)."""
    moved = json.loads((STUDY / "orders.json").read_text())
    assert PAYLOAD["rule"]["order"] == moved["order"]
    starts = dict(zip(moved["order"]["orders"], moved["order"]["from_nfe"], strict=True))
    for order, rows in moved["per_start"].items():
        allowed = {s: r for s, r in rows.items() if r["J"] <= moved["J_fit_order"] + MAX_J_LOSS}
        fewest = min(len(r["rises"]["tune"]) + len(r["rises"]["fit"]) for r in allowed.values())
        picked = allowed[str(starts.get(int(order), NEVER))]
        assert len(picked["rises"]["tune"]) + len(picked["rises"]["fit"]) == fewest, order
    assert starts == {1: 1, 2: 6}


def _broken(edit) -> dict:
    payload = copy.deepcopy(PAYLOAD)
    edit(payload)
    return payload


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: p.update(format="psb_fast.defaults/2"), "format"),
    (lambda p: p.pop("rule"), "missing \\['rule'\\]"),
    (lambda p: p.update(comment="x"), "unknown \\['comment'\\]"),
    (lambda p: p["rule"].update(variant="ddim"), "rule: variant"),
    (lambda p: p["rule"].update(q=0), "rule: q"),
    (lambda p: p["rule"].update(grid="x"), "rule: must be an object with keys"),
    (lambda p: p["rule"]["tau"].update(a=-1.0), "rule: tau needs a > 0"),
    (lambda p: p["rule"]["tau"].update(b=float("nan")), "rule: tau.b must be a finite"),
    (lambda p: p["rule"]["tau"].update(max=1.0), "rule: tau needs"),
    (lambda p: p["rule"]["order"].update(from_nfe=[2]), "rule: order.from_nfe"),
    (lambda p: p["rule"]["order"].update(orders=[5] * len(p["rule"]["order"]["orders"])), "rule: order"),
    (lambda p: p.update(scores=[]), "scores must be an object"),
])
def test_a_malformed_defaults_file_is_refused_naming_the_field(edit, match):
    with pytest.raises(ValueError, match=match):
        check_defaults(_broken(edit), "defaults.json")


def test_load_defaults_reports_bad_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_defaults(path)


def test_make_defaults_refuses_results_of_another_rule():
    results = make_defaults.read_results(STUDY)
    assert results["validate"] is not None
    changed = copy.deepcopy(results)
    changed["validate"]["nfes"]["7"]["setting"] = Setting(0.5, 2.0, 2).label
    with pytest.raises(ValueError, match="rerun `python -m studies.defaults_study validate`"):
        make_defaults.build(changed)


def test_rule_setting_follows_the_order_steps():
    rule = {"variant": VARIANTS[3], "q": 1.0, "tau": {"a": 1.0, "b": 0.5, "min": 0.01, "max": 0.6},
            "order": {"from_nfe": [1, 6, 12], "orders": [1, 2, 3]}}
    assert [rule_setting(rule, n).order for n in (1, 2, 3, 5, 6, 11, 12, 500)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rule_setting(rule, 1).T == pytest.approx(0.4)
    assert rule_setting(rule, 10 ** 6).T == pytest.approx(0.99)


# ----------------------------------------------------------------------------- monotonicity


def _draw_errors(model, bridge: PhaseBridge, m0: torch.Tensor, target: torch.Tensor,
                 setting_of: Callable[[int], Setting], nfes=CHECK_NFES) -> dict[int, torch.Tensor]:
    """Per NFE the squared error per draw (mean over coordinates) of setting_of(nfe), [B]."""
    out = {}
    with torch.no_grad():
        for nfe in nfes:
            x = run_settings(model, bridge, m0, nfe, [setting_of(nfe)])[0]
            out[nfe] = (x.double() - target.double()).pow(2).reshape(len(m0), -1).mean(1)
    return out


def exact_drift_rises(setting_of: Callable[[int], Setting], draws: int = 96,
                      nfes: tuple[int, ...] = CHECK_NFES) -> dict[str, list]:
    """The monotonicity violations (studies.defaults_study.monotonicity) of `setting_of` on three
    fixed exact-drift problems: a ring of 8 modes, a 3x3 grid, a 21-D two-mode mixture of the
    validate split (benchmarks/problems.py seed 4); error against the exact flow's endpoint."""
    from benchmarks.problems import problem

    bridge = PhaseBridge()
    mixtures = {"ring-8": mixture_2d_ring(8), "grid-3x3": mixture_2d_grid(3),
                "validate-4": problem(4).mixture}
    out = {}
    for name, mix in mixtures.items():
        gen = torch.Generator().manual_seed(0)
        m0 = bridge.sample_prior((draws, mix.dim), generator=gen).double()
        target = mix.posterior_mean(bridge, ode_solution(mix, bridge, m0, 1e-5, T_END, 1e-9, 1e-9), T_END)
        out[name] = monotonicity(_draw_errors(mix.as_model(bridge), bridge, m0, target, setting_of, nfes))
    return out


@pytest.mark.slow
def test_the_defaults_error_does_not_rise_with_nfe_on_exact_drifts():
    """Between consecutive checked NFEs the error rises at most 5% beyond two standard errors of the
    measured ratio. The previous per-NFE table failed this on all three problems (e.g. ring-8 3.2x
    from NFE 13 to 14, grid-3x3 13x from 36 to 38, validate-4 5.8x from 7 to 8)."""
    rises = exact_drift_rises(default_setting)
    assert rises == {name: [] for name in rises}


@pytest.mark.slow
def test_the_monotonicity_check_catches_a_jump():
    """The check itself: a table that switches to a far worse setting at one NFE fails it."""
    def jumpy(nfe: int) -> Setting:
        return Setting(0.3, 2.0, 1) if nfe == 14 else default_setting(nfe)

    rises = exact_drift_rises(jumpy, draws=64, nfes=(12, 13, 14, 15))
    assert any(r["from"] == 13 and r["to"] == 14 and r["ratio"] > 1.05 for r in rises["ring-8"])


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known: the rule's order step 1 -> 2 at NFE 6 raises the error of "
                   "this small network 2.1x from NFE 5 to 6 (the digits UNet 1.3x: trained.md); no start of "
                   "order 2 in NFE 4..16 is rise-free on the choice set either (orders.md); not met yet")
def test_the_defaults_error_does_not_rise_with_nfe_on_a_small_trained_model(tmp_path):
    """A 2-D MLP trained here for 300 steps (one thread); error against its own converged solution
    (psb_fast.tuning.reference_solution at NFE 400), NFE 1..TRAINED_MAX_NFE. Above that, on trained
    networks, errors below ~1e-2 jump between neighbouring NFEs for the published setting as well
    (benchmarks/results/defaults_study/trained.md), so the check stops there."""
    from psb_fast.config import TrainConfig
    from psb_fast.pretrained import load_trained
    from psb_fast.train import train_or_resume
    from psb_fast.tuning import reference_solution

    cfg = TrainConfig(data="rings", model="mlp", model_kwargs={"hidden": 64, "depth": 2}, batch_size=256,
                      steps=300, lr=2e-3, warmup_steps=50, ema_decay=0.99, ckpt_every=300, log_every=100,
                      eval_every=0, eval_samples=0, device="cpu", threads=1, out_dir=str(tmp_path / "run"))
    train_or_resume(cfg, progress=False)
    trained = load_trained(tmp_path / "run")
    m0 = trained.prior(256, seed=3).double()
    with torch.no_grad():
        target = reference_solution(trained.model, trained.bridge, m0, nfe=400)
    rises = monotonicity(_draw_errors(trained.model, trained.bridge, m0, target, default_setting,
                                      tuple(range(1, TRAINED_MAX_NFE + 1))))
    assert rises == [] and not math.isnan(float(target.sum()))


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
