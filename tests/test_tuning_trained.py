"""The robustness stage of the tuned defaults (studies/tuning_trained.py): its selection rule,
its candidate sets, its error cache, and one tiny end-to-end run on exact-drift mixtures."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psb_fast import PhaseBridge
from psb_fast.oracles import mixture_2d_grid, mixture_2d_ring
from psb_fast.settings import Setting, published_setting
from psb_fast.tuning import reference_solution, settings_rmse
from studies import tuning_trained as tt

torch.set_num_threads(1)


def test_robust_choice_rejects_a_candidate_that_loses_on_one_problem():
    # candidate 1 has the best geometric mean but loses on problem 2; candidate 2 wins everywhere
    errs = torch.tensor([[1.0, 0.1, 0.8],
                         [1.0, 0.1, 0.7],
                         [1.0, 1.2, 0.9]], dtype=torch.float64)
    index, info = tt.robust_choice(errs)
    assert index == 2
    assert info["admissible"].tolist() == [True, False, True]
    assert info["gmean"][1] < info["gmean"][2]
    assert math.isclose(float(info["gmean"][2]), (0.8 * 0.7 * 0.9) ** (1 / 3), rel_tol=1e-12)


def test_robust_choice_falls_back_to_published():
    errs = torch.tensor([[2.0, 1.0, 3.0], [1.0, 0.5, 4.0], [1.0, 1.01, 0.2]])
    index, info = tt.robust_choice(errs, published=0)
    assert index == 0
    assert info["admissible"].tolist() == [True, False, False]
    # published need not be column 0
    index, _ = tt.robust_choice(errs[:, [1, 0, 2]], published=1)
    assert index == 1


def test_robust_choice_margin_and_ties():
    errs = torch.tensor([[1.0, 0.95, 0.95], [1.0, 0.95, 0.95]])
    assert tt.robust_choice(errs)[0] == 1  # tie -> lower index
    assert tt.robust_choice(errs, max_ratio=0.9)[0] == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_robust_choice_never_worse_than_published(P, C, seed):
    gen = torch.Generator().manual_seed(seed)
    errs = torch.exp(torch.randn(P, C, generator=gen, dtype=torch.float64) * 0.3)
    pub = seed % C
    index, info = tt.robust_choice(errs, published=pub)
    assert (errs[:, index] <= errs[:, pub]).all()
    admissible = (errs <= errs[:, pub : pub + 1]).all(0)
    scores = torch.log(errs / errs[:, pub : pub + 1]).mean(0)
    assert math.isclose(float(scores[index]), float(scores[admissible].min()), abs_tol=1e-12)


@pytest.mark.parametrize("errs, match", [
    (torch.ones(3), "shape"),
    (torch.tensor([[0.0, 1.0]]), "positive published"),
    (torch.tensor([[1.0, float("nan")]]), "finite"),
])
def test_robust_choice_bad_input(errs, match):
    with pytest.raises(ValueError, match=match):
        tt.robust_choice(errs)
    with pytest.raises(ValueError, match="published"):
        tt.robust_choice(torch.ones(2, 2), published=2)


def test_candidates_variants_of_the_tuned_entry():
    fractions = tuple(i / 9 for i in range(10))
    picks = {9: Setting(0.7, 1.5, 3), 10: Setting(0.8, 1.375, 3, fractions), 11: Setting(0.85, 1.25, 3)}
    named = tt.candidates(10, picks)
    assert list(named)[:2] == ["published", "tuned"]
    assert named["published"] == published_setting(10).effective(10)
    assert named["tuned"] == Setting(0.8, 1.375, 3, fractions)
    assert named["tuned-order2"] == Setting(0.8, 1.375, 2, fractions)
    assert named["tuned-power"] == Setting(0.8, 1.375, 3)
    assert named["tuned-grid-pubT"].T == pytest.approx(published_setting(10).T)
    assert named["tuned-grid-pubT-order2"].as_tuple()[1:] == (1.375, 2, fractions)
    assert named["prev-nfe"] == Setting(0.7, 1.5, 3) and named["next-nfe"] == Setting(0.85, 1.25, 3)
    values = list(named.values())
    assert len(set(values[1:])) == len(values) - 1  # no duplicates after "published"
    with pytest.raises(ValueError, match="nfe"):
        tt.candidates(12, picks)


def test_candidates_keep_the_published_T_exactly():
    # published_T(17) = 0.8400000000000001: a rounded T would make a different (if close) sampler
    nfe = 17
    named = tt.candidates(nfe, {nfe: Setting(0.8, 1.5, 3)})
    assert named["published"] == published_setting(nfe)
    assert named["tuned-grid-pubT"].T == published_setting(nfe).T


def test_candidates_order_lowered_and_tuned_kept_when_published():
    nfe = 3
    pub = published_setting(nfe)
    named = tt.candidates(nfe, {nfe: pub})
    assert named["tuned"] == named["published"]
    assert all(s.order <= nfe - 2 for s in named.values())


class _Counting:
    key, name = "fake", "fake"

    def __init__(self):
        self.calls = []

    def rmse(self, nfe, settings):
        self.calls.append(list(settings))
        return torch.tensor([s.T * nfe for s in settings], dtype=torch.float64)


def test_error_cache_scores_only_new_settings(tmp_path):
    path = tmp_path / "errors.json"
    problem = _Counting()
    a, b = (0.5, 2.0, 2), (0.6, 1.5, 3)
    assert tt.ErrorCache(path).errors(problem, 4, [a]).tolist() == [2.0]
    cache = tt.ErrorCache(path)  # reloaded from the file
    assert cache.errors(problem, 4, [b, a]).tolist() == pytest.approx([2.4, 2.0])
    assert problem.calls == [[Setting(*a)], [Setting(*b)]]
    assert tt.ErrorCache.key(problem, 4, Setting(*a)) == "fake|4|(0.5, 2.0, 2)"  # the keys of earlier caches


class _Synthetic:
    """Error = a fixed function of the setting: T far from T_best costs, order 3 costs `penalty3`."""

    def __init__(self, name, T_best, penalty3):
        self.name = self.key = name
        self.T_best, self.penalty3 = T_best, penalty3
        self.scored = []

    def rmse(self, nfe, settings):
        self.scored += list(settings)
        return torch.tensor([1.0 + abs(s.T - self.T_best) + self.penalty3 * (s.order == 3) for s in settings],
                            dtype=torch.float64)


def test_run_stage_keeps_an_admissible_tuned_entry_without_scoring_variants(tmp_path):
    nfe = 20
    pub_T = published_setting(nfe).T
    problems = [_Synthetic("a", pub_T - 0.05, 0.0), _Synthetic("b", pub_T - 0.04, 0.0)]
    picks = {nfe: Setting(pub_T - 0.05, 1.5, 3)}
    result = tt.run_stage(problems, tt.ErrorCache(tmp_path / "e.json"), [nfe], progress=False, picks=picks)
    assert result[nfe]["pick"] == "tuned" and result[nfe]["tuned_kept"]
    assert set(result[nfe]["candidates"]) == {"published", "tuned"}
    assert len(problems[0].scored) == 2


def test_run_stage_replaces_a_tuned_entry_that_loses_on_one_problem(tmp_path):
    nfe = 20
    pub_T = published_setting(nfe).T
    # order 3 loses on the "trained" problem b; the order-2 variant of the tuned grid wins on both
    problems = [_Synthetic("a", pub_T - 0.05, 0.0), _Synthetic("b", pub_T - 0.05, 0.2)]
    picks = {nfe: Setting(pub_T - 0.05, 1.5, 3)}
    result = tt.run_stage(problems, tt.ErrorCache(tmp_path / "e.json"), [nfe], progress=False, picks=picks)
    r = result[nfe]
    assert not r["tuned_kept"] and not r["candidates"]["tuned"]["admissible"]
    assert r["candidates"]["tuned"]["ratios"]["b"] > 1
    assert r["pick"] == "published" and Setting.coerce(r["setting"]) == published_setting(nfe)  # no re-pick
    repicked = tt.run_stage(problems, tt.ErrorCache(tmp_path / "g.json"), [nfe], progress=False,
                            picks=picks, repick=True)[nfe]
    assert repicked["setting"][2] == 2 and repicked["setting"][0] == pytest.approx(pub_T - 0.05)
    assert all(v <= 1 for v in repicked["candidates"][repicked["pick"]]["ratios"].values())
    full = tt.run_stage(problems, tt.ErrorCache(tmp_path / "f.json"), [nfe], progress=False, picks=picks,
                        full=True, repick=True)
    assert full[nfe]["setting"] == repicked["setting"]


class _Mixture:
    """An exact-drift mixture against its own NFE-200 solution (a stand-in for a trained model)."""

    def __init__(self, name, mix):
        bridge = PhaseBridge()
        self.name = self.key = name
        self.model, self.bridge = mix.as_model(bridge), bridge
        gen = torch.Generator().manual_seed(0)
        self.m0 = bridge.sample_prior((64, 2), generator=gen, dtype=torch.float64)
        self.target = reference_solution(self.model, bridge, self.m0, 200)

    def rmse(self, nfe, settings):
        return settings_rmse(self.model, self.bridge, self.m0, self.target, nfe, settings)


def test_run_stage_pick_never_worse_than_published(tmp_path):
    problems = [_Mixture("grid", mixture_2d_grid()), _Mixture("ring", mixture_2d_ring())]
    result = tt.run_stage(problems, tt.ErrorCache(tmp_path / "e.json"), nfes=(5, 12), progress=False,
                          full=True)
    for nfe, r in result.items():
        pub = published_setting(nfe)
        for p in problems:
            e_pick, e_pub = p.rmse(nfe, [r["setting"], pub]).tolist()
            assert e_pick <= e_pub * (1 + 1e-9)
            assert r["candidates"][r["pick"]]["ratios"][p.name] == pytest.approx(e_pick / e_pub, rel=1e-9)
        assert r["candidates"]["published"]["admissible"]


def test_bar_images_are_seeded_bars_in_range():
    x = tt.bar_images(256, seed=3)
    assert x.shape == (256, 64) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(x, tt.bar_images(256, seed=3)) and not torch.equal(x, tt.bar_images(256, seed=4))
    lit = (x > 0).float().mean(1)  # one bar: some pixels lit, most dark
    assert bool((lit > 0).all()) and float(lit.mean()) < 0.4
