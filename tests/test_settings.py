"""One home per concept: the Setting type, the grids, T_END, the published settings and the seeds."""

from __future__ import annotations

import hashlib
import math
import zlib

import pytest
import torch

import psb_fast.oracles
import psb_fast.sampler
from psb_fast import PhaseBridge, PhaseSampler, defaults, grids
from psb_fast.reference import grids as reference_grids
from psb_fast.seeds import derive_seed, row_seed, step_seed
from psb_fast.settings import T_END, Setting, load_tuned, published_setting, published_T

FRACTIONS = (0.0, 0.1, 0.3, 0.55, 0.8, 1.0)


# ----------------------------------------------------------------------------- Setting


def test_setting_normalizes_and_compares_like_its_tuple():
    s = Setting(0.7, 2, 2)
    assert (s.T, s.q, s.order, s.fractions, s.variant) == (0.7, 2.0, 2, None, "multistep")
    assert isinstance(s.q, float) and isinstance(s.order, int)
    assert s == Setting(0.7, 2.0, 2) and hash(s) == hash(Setting(0.7, 2.0, 2))
    free = Setting(0.8, 1.5, 3, [0, 0.1, 0.3, 0.55, 0.8, 1])
    assert free.fractions == FRACTIONS and isinstance(free.fractions, tuple)
    settings = [Setting(0.8, 1.5, 3, FRACTIONS), Setting(0.8, 1.5, 3), Setting(0.4, 2.0, 2),
                Setting(0.8, 1.25, 3)]
    assert [x.as_tuple() for x in sorted(settings)] == sorted(x.as_tuple() for x in settings)
    assert len({Setting(0.5, 2.0, 2), Setting(0.5, 2, 2)}) == 1


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"T": 1.0}, "T"), ({"T": 0.0}, "T"), ({"T": math.nan}, "T"), ({"T": True}, "T"), ({"T": "0.5"}, "T"),
    ({"q": 0.0}, "q"), ({"q": -1.0}, "q"), ({"q": math.inf}, "q"),
    ({"order": 4}, "order"), ({"order": -1}, "order"), ({"order": 2.0}, "order"), ({"order": True}, "order"),
    ({"fractions": (0.0, 0.5, 0.4, 1.0)}, "fractions"), ({"fractions": (0.1, 1.0)}, "fractions"),
    ({"fractions": (0.0, 0.9)}, "fractions"), ({"fractions": "0,1"}, "fractions"),
    ({"fractions": (0.0,)}, "fractions"),
    ({"fractions": (0.0, True, 1.0)}, "fractions"), ({"variant": "data-prediction"}, "variant"),
])
def test_setting_rejects_bad_fields_naming_them(kwargs, field):
    args = {"T": 0.7, "q": 2.0, "order": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        Setting(**args)


def test_setting_json_round_trip_and_tuned_entries():
    free = Setting(0.8, 1.5, 3, FRACTIONS)
    assert free.to_json() == {"T": 0.8, "q": 1.5, "order": 3, "fractions": list(FRACTIONS),
                              "variant": "multistep"}
    assert Setting.from_json(free.to_json()) == free
    # a psb_fast.tune entry (old files: no variant, extra keys)
    entry = {"T": 0.6, "q": 1.25, "order": 2, "rmse": 0.01, "published": [0.4, 2.0, 2]}
    assert Setting.from_json(entry) == Setting(0.6, 1.25, 2)
    with pytest.raises(ValueError, match="unknown"):
        Setting.from_json(entry, strict=True)
    with pytest.raises(ValueError, match="order"):
        Setting.from_json({"T": 0.6, "q": 1.25})
    assert Setting.coerce([0.8, 1.5, 3, list(FRACTIONS)]) == free == Setting.coerce(free.as_tuple())
    assert Setting.coerce((0.4, 2.0, 2, None)) == Setting(0.4, 2.0, 2)
    assert Setting.coerce({"T": 0.4, "q": 2, "order": 2}) == Setting(0.4, 2.0, 2)
    with pytest.raises(ValueError, match="setting"):
        Setting.coerce((0.4, 2.0))


def test_setting_grid_label_effective_and_replace():
    free = Setting(0.8, 1.5, 3, FRACTIONS)
    assert torch.equal(free.grid(6, 1e-5), grids.power_grid(6, 1e-5, 0.8, 1.5, FRACTIONS))
    with pytest.raises(ValueError, match="fractions"):
        free.grid(5)
    with pytest.raises(ValueError, match="T"):
        Setting(0.3).grid(4, t0=0.5)
    assert free.label == "T 0.8, q 1.5, order 3, free grid"
    assert Setting(0.7).label == "T 0.7, q 2, order 2"
    assert free.effective(4).order == 2 and free.effective(6) is free
    assert Setting(0.5, 2.0, 3).effective(2).order == 0
    assert free.replace(T=0.9).T == 0.9
    with pytest.raises(ValueError, match="T"):
        free.replace(T=2.0)
    with pytest.raises(TypeError):
        free.replace(nfe=3)


def test_published_setting_is_the_published_sampler():
    assert published_setting(10) == Setting(0.7, 2.0, 2)
    assert published_setting(16).T == published_T(16) == 0.8200000000000001
    assert psb_fast.sampler.published_T is published_T
    bridge = PhaseBridge()
    for nfe in (5, 10, 20):
        kwargs = published_setting(nfe).sampler_kwargs()
        assert kwargs == {"T": published_T(nfe), "order": 2, "grid": "rev-quad", "variant": "multistep"}
        a, b = PhaseSampler(bridge, nfe, **kwargs), PhaseSampler(bridge, nfe, T=published_T(nfe), order=2,
                                                                 grid="rev-quad")
        assert torch.equal(a.grid, b.grid) and (a.T, a.order, a.grid_kind) == (b.T, b.order, "rev-quad")
    free = Setting(0.8, 1.5, 3, FRACTIONS)
    sampler = PhaseSampler(bridge, 6, **free.sampler_kwargs(6))
    assert torch.equal(sampler.grid, free.grid(6)) and sampler.order == 3
    with pytest.raises(ValueError, match="nfe"):
        free.sampler_kwargs()
    assert Setting(0.8, 1.375, 2).sampler_kwargs()["grid"] == "power-1.375"


def test_one_end_time():
    assert T_END == 0.999
    assert psb_fast.sampler.T_END is T_END and psb_fast.oracles.T_END is T_END


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 20, 50, 101])
@pytest.mark.parametrize(("t0", "T"), [(1e-5, 0.999), (1e-5, 0.7), (0.0, 0.4), (0.1, 0.9)])
def test_grids_equal_the_reference_transcription_bitwise(n, t0, T):
    for q in (0.5, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0):
        assert torch.equal(grids.power_grid(n, t0, T, q), reference_grids.rev_quad_grid(n, t0, T, q))
    assert torch.equal(grids.rev_quad_grid(n, t0, T), reference_grids.rev_quad_grid(n, t0, T))
    assert torch.equal(grids.uniform_grid(n, t0, T), reference_grids.uniform_grid(n, t0, T))
    assert torch.equal(grids.make_grid("power-1.5", n, t0, T), reference_grids.rev_quad_grid(n, t0, T, 1.5))
    assert torch.equal(grids.make_grid("rev-quad", n, t0, T), reference_grids.rev_quad_grid(n, t0, T, 2.0))
    assert torch.equal(grids.make_grid("uniform", n, t0, T), reference_grids.uniform_grid(n, t0, T))
    if n > 1:
        r = torch.arange(n, dtype=torch.float64) / (n - 1)
        assert torch.equal(grids.power_grid(n, t0, T, 1.5, r.tolist()), grids.power_grid(n, t0, T, 1.5))


def test_the_default_grid_comes_from_the_defaults_not_the_grids_module(monkeypatch):
    """psb_fast.grids sits below the defaults (no import cycle): its one make_grid refuses the
    "default" grid (and its old name "tuned"), which is the default setting's own grid."""
    from psb_fast import backends

    monkeypatch.setattr(backends, "_WARNED", set())  # warn_once: an earlier test may have warned
    for name in ("default", "tuned"):
        with pytest.raises(ValueError, match="default_setting"):
            grids.make_grid(name, 6, 1e-5, 0.8)
    assert not hasattr(psb_fast.sampler, "make_grid") and not hasattr(defaults, "make_grid")
    bridge = PhaseBridge()
    sampler = PhaseSampler(bridge, 6)
    assert sampler.grid_kind == "default"
    assert torch.equal(sampler.grid, defaults.default_setting(6).grid(6, 1e-5))
    with pytest.warns(FutureWarning, match="grid='default'"):
        old = PhaseSampler(bridge, 6, grid="tuned")
    assert old.setting == sampler.setting and torch.equal(old.grid, sampler.grid)


def test_grid_names_parse_and_round_trip():
    assert grids.parse_grid("tuned") == ("tuned", None)
    assert grids.parse_grid("uniform") == ("uniform", None)
    assert grids.parse_grid("rev-quad") == ("power", 2.0)
    assert grids.parse_grid("power-2.5") == ("power", 2.5)
    for q in (2.0, 1.375, 0.1 + 0.2, 3.0):
        assert grids.parse_grid(grids.grid_name(q)) == ("power", q)
    for bad in ("power-0", "power--1", "power-inf", "power-nan", "power-x", "quad", "", None, 2.0):
        with pytest.raises(ValueError, match=r"\bgrid\b"):
            grids.parse_grid(bad)


@pytest.mark.parametrize(("args", "name"), [
    ((0, 1e-5, 0.9), "nfe"), ((2.0, 1e-5, 0.9), "nfe"), ((True, 1e-5, 0.9), "nfe"),
    ((5, 0.5, 0.5), "T"), ((5, 1e-5, 1.0), "T"), ((5, 1e-5, math.nan), "T"),
    ((5, -0.1, 0.5), "t0"), ((5, math.nan, 0.5), "t0"),
])
def test_grid_validation_names_the_argument(args, name):
    for fn in (grids.power_grid, grids.rev_quad_grid, grids.uniform_grid):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            fn(*args)


def test_explicit_grid_checks_the_times():
    times = grids.explicit_grid([1e-5, 0.2, 0.5], 3, 1e-5)
    assert times.dtype == torch.float64 and times.tolist() == [1e-5, 0.2, 0.5]
    for bad, match in [([1e-5, 0.5, 0.4], "increasing"), ([1e-5, 0.5], "nfe=3"), ([0.1, 0.2, 0.3], "t0"),
                       ("abc", "grid")]:
        with pytest.raises(ValueError, match=match):
            grids.explicit_grid(bad, 3, 1e-5)


# ----------------------------------------------------------------------------- seeds


def test_seed_policy_values_are_the_recorded_ones():
    """The formulas the recorded outputs (golden samples, training runs) were made with."""
    for parts in ((0, "data", 0, 0), (7, "noise", 12), (3, "prior", 41), (1, "eval")):
        digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
        assert derive_seed(*parts) == int.from_bytes(digest, "little") % 2**63
    assert derive_seed(0, "eval") == 2045356896302733022
    for seed, i in ((0, -1), (3, 0), (2**31 - 2, 19)):
        assert step_seed(seed, i) == zlib.crc32(f"{seed}:{i}".encode()) & 0x7FFFFFFF
    assert step_seed(3, 0) == 1511812110
    assert row_seed(5, 0) == 5 and row_seed(5, 3) == (5 ^ (3 * 0x9E3779B97F4A7C15)) % 2**64


def test_tuned_file_with_two_keys_for_one_nfe_is_refused(tmp_path):
    """Keys "10" and "010" both mean NFE 10: refused naming both, not the last one silently."""
    path = tmp_path / "tuned.json"
    entry = {"T": 0.75, "q": 1.5, "order": 2}
    settings = f'"10": {json_dumps(entry)}, "010": {json_dumps({**entry, "T": 0.5})}'
    path.write_text('{"format": "psb_fast.tuned/1", "settings": {' + settings + "}}")
    with pytest.raises(ValueError, match="'10' and '010' both mean NFE 10"):
        load_tuned(path)
    path.write_text('{"format": "psb_fast.tuned/1", "settings": {"+10": ' + json_dumps(entry) + "}}")
    with pytest.raises(ValueError, match="not an integer written in digits"):
        load_tuned(path)


def test_binary_tuned_file_is_one_line_naming_file_and_role(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="tuned-settings file") as info:
        load_tuned(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def json_dumps(value) -> str:
    import json

    return json.dumps(value)
