"""Write the package defaults, psb_fast/defaults.json, from the defaults study's results.

    python -m studies.make_defaults            # write psb_fast/defaults.json
    python -m studies.make_defaults --check    # exit 1 if the file is not what the results give

Run from the repository root (studies/ is not installed). Inputs, in
benchmarks/results/defaults_study/ (or --results), all written by studies/defaults_study.py:

1. fit.json: the rule's parameters fitted on the tune split and the fit models (required);
   orders.json: where the order steps (replaces fit.json's order steps when present);
2. validate.json: the rule vs published at every NFE 1..50 (and a few above) on the validate split;
3. trained.json: the same on the trained models (fit and held out);
4. test.json: the test split (written after the defaults; its summary is recorded when present).

The file holds the rule (fit.json's, with orders.json's order steps), where it came from and its
scores; the schema is in psb_fast/defaults.py. Validate, trained and test results must be for the
current rule (else ValueError: rerun them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from psb_fast.defaults import FORMAT, check_defaults, rule_setting
from studies import defaults_study

ROOT = Path(__file__).resolve().parents[1]
RESULTS = defaults_study.OUT
OUT = ROOT / "psb_fast" / "defaults.json"
COMMAND = "python -m studies.make_defaults"
DIGITS = 4  # significant digits of the stored scores
STAGES = ("fit", "orders", "validate", "trained", "test")
ABOUT = ("Defaults of PhaseSampler (probability flow, hop): one rule of the NFE (psb_fast/defaults.py). Data "
         "written by `python -m studies.make_defaults` from studies/defaults_study.py's results.")


def read_results(results: Path) -> dict[str, dict | None]:
    """The study's result files by stage (None where a stage other than fit is missing)."""
    out = {}
    for stage in STAGES:
        path = results / f"{stage}.json"
        if not path.is_file():
            if stage == "fit":
                raise FileNotFoundError(f"{path} is missing: run `python -m studies.defaults_study search` "
                                        "and `... fit` first")
            out[stage] = None
            continue
        out[stage] = json.loads(path.read_text())
    return out


def _check_stage(rule: dict, stage: str, labels: Mapping[str, str]) -> None:
    for nfe, label in labels.items():
        expected = rule_setting(rule, int(nfe)).label
        if label != expected:
            raise ValueError(f"{stage}.json scored {label!r} at NFE {nfe}, but the rule gives {expected!r}: "
                             f"rerun `python -m studies.defaults_study {stage}`")


def build(results: Mapping[str, Mapping | None]) -> dict:
    """The defaults file's payload (JSON values) from the study's results."""
    fit, moved = results["fit"], results.get("orders")
    rule = fit["rule"]
    if moved is not None:
        if {k: v for k, v in moved["fit_rule"].items() if k != "order"} != {
                k: v for k, v in rule.items() if k != "order"}:
            raise ValueError("orders.json is for another fit: rerun "
                             "`python -m studies.defaults_study orders`")
        rule = {**rule, "order": moved["order"]}
    provenance = {"fit": {"results": "benchmarks/results/defaults_study/fit.json",
                          "command": "python -m studies.defaults_study search; python -m "
                                     "studies.defaults_study "
                                     "fit",
                          "problems": f"{fit['problems']} generated problems of the tune split "
                                      "(benchmarks/problems.py)",
                          "models": fit["models"], "fit_nfes": fit["fit_nfes"],
                          "loss_weight": fit["loss_weight"],
                          "objective": "mean over the fit NFEs of J_exact + J_trained, J = mean log ratio + "
                                       "loss_weight mean max(log ratio, 0), ratio = RMSE / RMSE of the "
                                       "published setting", "J": _round(fit["J"])}}
    if moved is not None:
        provenance["orders"] = {"results": "benchmarks/results/defaults_study/orders.json",
                                "command": "python -m studies.defaults_study orders",
                                "choice_set": moved["choice_set"], "check_set": moved["check_set"],
                                "fit_order": fit["rule"]["order"], "J": _round(moved["J"])}
    scores: dict = {"fit": {n: {k: v for k, v in s.items() if k != "setting_scored"}
                            for n, s in fit["scores"].items()}}
    validate = results.get("validate")
    if validate is not None:
        provenance["validate"], scores["validate"] = _split_stage(rule, "validate", validate)
        provenance["validate"]["problems_with_rises"] = validate["problems_with_rises"]
    trained = results.get("trained")
    if trained is not None:
        provenance["trained"] = {"results": "benchmarks/results/defaults_study/trained.json",
                                 "command": "python -m studies.defaults_study trained",
                                 "models": {m: r["role"] for m, r in trained["models"].items()},
                                 "rises": {m: len(r["rises"]) for m, r in trained["models"].items()}}
        scores["trained"] = {str(n): {m: _round(r["table"][str(n)]["rule"] / r["table"][str(n)]["published"])
                                      for m, r in trained["models"].items()} for n in trained["nfes"]}
    test = results.get("test")
    if test is not None:
        provenance["test"], scores["test"] = _split_stage(rule, "test", test)
    return {"format": FORMAT, "command": COMMAND, "about": ABOUT, "rule": rule, "provenance": provenance,
            "scores": scores}


def _split_stage(rule: dict, stage: str, result: dict) -> tuple[dict, dict]:
    """(provenance, scores) of a stage scored on a split of generated problems ("validate", "test"),
    after checking that it scored this rule."""
    _check_stage(rule, stage, {n: r["setting"] for n, r in result["nfes"].items()})
    provenance = {"results": f"benchmarks/results/defaults_study/{stage}.json",
                  "command": f"python -m studies.defaults_study {stage}",
                  "problems": f"{len(result['problems'])} generated problems of the {stage} split, "
                              f"{result['draws']} prior draws each"}
    scores = {n: {k: _round(r[k]) for k in ("median", "worst", "losses")} for n, r in result["nfes"].items()}
    return provenance, scores


def _round(x: float) -> float | int:
    return x if isinstance(x, int) else float(f"{x:.{DIGITS}g}")


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
