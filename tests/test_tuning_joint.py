"""The joint search of the sampler defaults (studies/tuning_joint.py) on synthetic problems."""

from __future__ import annotations

import math

import pytest
import torch

from psb_fast.defaults import default_setting
from psb_fast.settings import Setting, published_setting
from studies import tuning_joint as tj
from studies import tuning_trained as tt


def test_joint_objective_weights_the_worst_mixture_and_guards_trained_models():
    is_trained = torch.tensor([False, False, True])
    lr = torch.log(torch.tensor([[0.5, 0.3], [0.5, 0.7], [0.8, 0.8]], dtype=torch.float64))
    J = tj.joint_objective(lr, is_trained)
    expected = [float(lr[:, 0].mean()) + math.log(0.5), float(lr[:, 1].mean()) + math.log(0.7)]
    assert J.tolist() == pytest.approx(expected)
    assert J[0] < J[1]  # same mean over mixtures, the second has a worse worst mixture
    lr_bad = torch.log(torch.tensor([[0.1], [0.1], [0.95]], dtype=torch.float64))
    penalty = tj.GUARD_WEIGHT * (math.log(0.95) - math.log(tj.GUARD_MARGIN))
    assert float(tj.joint_objective(lr_bad, is_trained)[0]) == pytest.approx(
        float(lr_bad.mean() + math.log(0.1)) + penalty)


class _RowsSynthetic:
    """Error per row r: (1 + |T - T_best| + penalty3 [order 3]) * (1 + r / 100), mean over the rows."""

    def __init__(self, name, T_best, penalty3, n=8):
        self.name = self.key = name
        self.T_best, self.penalty3, self.n = T_best, penalty3, n

    def rmse(self, nfe, settings, rows=slice(None)):
        w = (1 + torch.arange(self.n, dtype=torch.float64)[rows] / 100).mean()
        return torch.tensor([(1.0 + abs(s.T - self.T_best) + self.penalty3 * (s.order == 3)) * float(w)
                             for s in settings], dtype=torch.float64)


def test_rows_view_has_its_own_key_and_rows():
    p = _RowsSynthetic("a", 0.5, 0.0)
    v = tt.RowsView(p, slice(0, 4))
    assert v.key == "a:rows0-4" and v.name == "a"
    s = [Setting(0.5, 2.0, 2)]
    assert v.rmse(5, s).tolist() == p.rmse(5, s, slice(0, 4)).tolist()


def test_search_nfe_finds_the_setting_good_on_mixtures_and_safe_on_trained_models(tmp_path):
    nfe = 5
    pub_T = published_setting(nfe).T
    T_best = 0.7
    problems = [_RowsSynthetic("mix-a", T_best, 0.0), _RowsSynthetic("mix-b", T_best + 0.02, 0.0),
                _RowsSynthetic("model", T_best, 1.0)]
    is_trained = torch.tensor([False, False, True])
    cache = tt.ErrorCache(tmp_path / "errors.json")
    r = tj.search_nfe(problems, is_trained, [8, 8, 8], cache, nfe, orders=(2, 3), progress=False)
    T, q, order = r["setting"][:3]
    assert order == 2  # order 3 costs on the trained model
    assert abs(T - T_best) < 0.05 and abs(T - pub_T) > 0.2
    assert r["admissible"] and all(v < 1 for v in r["ratios"].values())
    pick = Setting.coerce(r["setting"])
    expected = problems[0].rmse(nfe, [pick]) / problems[0].rmse(nfe, [published_setting(nfe)])
    assert r["ratios"]["mix-a"] == pytest.approx(float(expected[0]))
    assert any(k.startswith("mix-a:rows4-8|") for k in cache.data)  # the check half was scored apart


def test_ratio_interval_brackets_the_ratio_and_widens_with_rare_large_errors():
    from studies.tuning_study import ratio_interval

    gen = torch.Generator().manual_seed(0)
    sq_b = torch.rand(4000, generator=gen, dtype=torch.float64)
    sq_a = 0.25 * sq_b
    lo, hi = ratio_interval(sq_a, sq_b)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # a constant per-draw ratio
    flips = sq_a.clone()
    flips[:8] = 400.0  # eight draws sent to another mode carry most of the error
    ratio = float((flips.sum() / sq_b.sum()).sqrt())
    lo, hi = ratio_interval(flips, sq_b)
    assert lo < ratio < hi and hi - lo > 0.3 * ratio


def test_current_defaults_labels_the_joint_search_entries():
    from studies.tuning_study import current_defaults

    def entry(nfe):
        s = default_setting(nfe)
        return {**s.to_json(), "source": "tuned", "search": {}}

    previous = {"table": {str(n): entry(n) for n in range(1, 51)}}
    previous["table"]["7"]["T"] = 0.123  # recorded differently: replaced by the trained-model stage
    joint = {"5": {"setting": default_setting(5).as_tuple(), "admissible": True}}
    _, details = current_defaults(previous, joint)
    assert details[5]["source"] == "joint"
    assert details[7]["source"] == "trained" and details[7]["study_setting"][0] == 0.123
    assert details[6]["source"] == "tuned"
    joint["5"]["admissible"] = False
    assert current_defaults(previous, joint)[1][5]["source"] == "tuned"
