"""Write the package defaults, psb_fast/defaults.json, from the defaults study's results.

    python -m studies.make_defaults            # write psb_fast/defaults.json
    python -m studies.make_defaults --check    # exit 1 if the file is not what the results give

Run from the repository root (studies/ is not installed). Inputs, in
benchmarks/results/defaults_study/ (or --results), all written by studies/defaults_study.py:

1. search.json: the picks at the anchor NFEs on the tune split (required);
2. validate.json: per NFE 1..50 the interpolated pick and its alternates on the validate split;
3. trained.json: the same settings on the trained models, NFE 3..50.

Per NFE the entry is the first of the pick and its alternates (`defaults_study.alternates`) that
is not worse than the published setting
on the validate split (median ratio <= 1) and on every trained model (ratio <= 1); else the
published setting. Validate and trained results must be for the current picks (else ValueError:
rerun them). The file's schema is in psb_fast/defaults.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from psb_fast.defaults import FORMAT, check_defaults
from psb_fast.settings import Setting, published_setting
from studies import defaults_study

ROOT = Path(__file__).resolve().parents[1]
RESULTS = defaults_study.OUT
OUT = ROOT / "psb_fast" / "defaults.json"
COMMAND = "python -m studies.make_defaults"
DIGITS = 4  # decimals of the stored scores
ABOUT = ("Per-NFE defaults of PhaseSampler (probability flow, hop). Data written by `python -m "
         "studies.make_defaults` from studies/defaults_study.py's results; schema in psb_fast/defaults.py.")


def read_results(results: Path) -> dict[str, dict | None]:
    """The study's result files by stage (None where validate or trained is missing)."""
    out = {}
    for stage in ("search", "validate", "trained"):
        path = results / f"{stage}.json"
        if not path.is_file():
            if stage == "search":
                raise FileNotFoundError(
                    f"{path} is missing: run `python -m studies.defaults_study search` first")
            out[stage] = None
            continue
        out[stage] = json.loads(path.read_text())
    return out


def _rows(results: Mapping | None, stage: str, nfe: int, expected: list[Setting]) -> list[dict] | None:
    """A stage's rows for this NFE, checked to be for `expected` (None: the stage did not score it)."""
    if results is None or str(nfe) not in results["nfes"]:
        return None
    rows = results["nfes"][str(nfe)]["settings"]
    got = [Setting.from_json(r["setting"]) for r in rows]
    if got != expected:
        raise ValueError(f"{stage}.json scored {[s.label for s in got]} at NFE {nfe}, but the picks are "
                         f"{[s.label for s in expected]}: rerun `python -m studies.defaults_study {stage}`")
    return rows


def build(results: Mapping[str, Mapping | None]) -> dict:
    """The defaults file's payload (JSON values) from the study's results."""
    search = results["search"]
    anchors = {int(n): Setting.from_json(rec["pick"]) for n, rec in search["anchors"].items()}
    entries = {}
    for nfe in range(1, defaults_study.MAX_NFE + 1):
        cands = defaults_study.alternates(defaults_study.interpolated(anchors, nfe), nfe)
        validate = _rows(results.get("validate"), "validate", nfe, cands)
        trained = _rows(results.get("trained"), "trained", nfe, cands)
        chosen, pick = published_setting(nfe), "fallback: published"
        for k, setting in enumerate(cands):
            ok_validate = validate is None or validate[k]["median"] <= 1.0
            ok_trained = trained is None or trained[k]["worst"] <= 1.0
            if ok_validate and ok_trained:
                chosen = setting
                pick = ("searched" if nfe in anchors else "interpolated") + (f" (alternate {k})" * (k > 0))
                break
        scores = {}
        if nfe in anchors:
            scores["search"] = {k: _round(v) for k, v in search["anchors"][str(nfe)]["scores"].items()}
        for stage, rows in (("validate", validate), ("trained", trained)):
            if rows is not None:
                scores[stage] = [_scored(row) for row in rows]
        if chosen.effective(nfe) == published_setting(nfe).effective(nfe):
            chosen = published_setting(nfe)  # the same sampler: record it as the published setting
        setting = chosen.to_json()
        source = "published" if chosen == published_setting(nfe) else "tuned"
        if source == "published":  # the loader uses published_setting(nfe) itself
            setting["T"] = round(setting["T"], 10)
        entries[str(nfe)] = {"setting": setting, "source": source, "stage": "search", "pick": pick,
                             "scores": scores}
    stages = {"search": {"results": "benchmarks/results/defaults_study/search.json",
                         "command": "python -m studies.defaults_study search",
                         "problems": (f"{len(search['problems'])} generated problems of the tune split "
                                      f"(benchmarks/problems.py, seeds {search['seeds'][0]}.."
                                      f"{search['seeds'][-1]} step 3), {search['draws']} prior draws each"),
                         "scores": ("J = mean log ratio + LOSS_WEIGHT mean max(log ratio, 0), median and "
                                    "worst ratio, losses (ratio > 1); ratio = RMSE / RMSE of the published "
                                    "setting against the exact flow")}}
    if results.get("validate") is not None:
        v = results["validate"]
        stages["validate"] = {"results": "benchmarks/results/defaults_study/validate.json",
                              "command": "python -m studies.defaults_study validate",
                              "problems": f"{len(v['problems'])} generated problems of the validate split, "
                                          f"{v['draws']} prior draws each",
                              "scores": "per setting scored (the pick, then its alternates): median and "
                                        "worst ratio, losses"}
    if results.get("trained") is not None:
        stages["trained"] = {"results": "benchmarks/results/defaults_study/trained.json",
                             "command": "python -m studies.defaults_study trained",
                             "problems": list(results["trained"]["models"]),
                             "scores": "per setting scored (the pick, then its alternates): ratio per "
                                       "trained model against its own converged solution, worst"}
    return {"format": FORMAT, "command": COMMAND, "about": ABOUT, "stages": stages, "entries": entries}


def _scored(row: Mapping) -> dict:
    out = {"setting": Setting.from_json(row["setting"]).label}
    for key in ("median", "worst", "losses"):
        if key in row:
            out[key] = _round(row[key])
    if "ratios" in row and "median" not in row:  # trained: a few named models
        out["ratios"] = {k: _round(v) for k, v in row["ratios"].items()}
    return out


def _round(x: float) -> float:
    return round(float(x), DIGITS)


def dumps(payload: object) -> str:
    """JSON text, indented, with every list or object of plain values on one line."""

    def fmt(value, indent: int) -> str:
        if isinstance(value, dict):
            items = [(json.dumps(k), v) for k, v in value.items()]
            if all(not isinstance(v, (dict, list)) for _, v in items):
                return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in items) + "}"
            pad = " " * (indent + 1)
            body = ",\n".join(f"{pad}{k}: {fmt(v, indent + 1)}" for k, v in items)
            return "{\n" + body + "\n" + " " * indent + "}"
        if isinstance(value, list):
            if all(not isinstance(v, (dict, list)) for v in value):
                return json.dumps(value)
            pad = " " * (indent + 1)
            return "[\n" + ",\n".join(pad + fmt(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
        return json.dumps(value)

    return fmt(payload, 0) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the defaults study's results folder")
    ap.add_argument("--out", type=Path, default=OUT, help="the defaults file to write")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs")
    args = ap.parse_args(argv)
    text = dumps(build(read_results(args.results)))
    check_defaults(json.loads(text), str(args.out))  # what the package will read back
    if args.check:
        same = args.out.is_file() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from the results; run ' + COMMAND}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
