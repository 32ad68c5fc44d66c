"""Write the package defaults, psb_fast/defaults.json, from the studies' results.

    python -m studies.make_defaults            # write psb_fast/defaults.json
    python -m studies.make_defaults --check    # exit 1 if the file is not what the results give

Run from the repository root: studies/ is a plain folder of scripts (not installed with the
package); `python -m studies.<name>` puts the root on sys.path, so the studies import psb_fast and
each other (`from studies import tuning_study`) without path tricks.

Inputs (benchmarks/results/, or --results):
1. tuning.json (studies/tuning_study.py): per NFE 1..50 the mixture search's pick (the table entry,
   or its "study_setting" where `--evaluate-only` later recorded a replaced default there);
2. tuning_trained.json (studies/tuning_trained.py): where its pick is not "tuned", the trained-model
   check replaced the pick by that setting (the published one);
3. tuning_joint.json (studies/tuning_joint.py): its admissible results replace the entry.
Each entry records the setting, whether it is the published setting, the stage that set it, how
that stage picked it and the scores that chose it (ratios to the published setting, per named
problem); the file's schema is in psb_fast/defaults.py. A stage's file that is missing is
skipped. The trained check must have checked the mixture picks of 1. (else: ValueError: rerun it).

Then check the final defaults on held-out data: `python -m studies.tuning_study --evaluate-only`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from psb_fast.defaults import FORMAT, check_defaults
from psb_fast.settings import Setting, published_setting

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "psb_fast" / "defaults.json"
COMMAND = "python -m studies.make_defaults"
FILES = {"mixture": "tuning.json", "trained": "tuning_trained.json", "joint": "tuning_joint.json"}
SCRIPTS = {"mixture": "tuning_study", "trained": "tuning_trained", "joint": "tuning_joint"}
#: How the mixture study picked an entry (tuning.json "source") -> the entry's "pick".
MIXTURE_PICKS = {"tuned": "searched", "interp": "interpolated", "copy of NFE 2": "copy of NFE 2"}
DIGITS = 4  # decimals of the stored scores
ABOUT = ("Per-NFE defaults of PhaseSampler (probability flow, hop). Data written by `python -m "
         "studies.make_defaults` from the studies' results; schema in psb_fast/defaults.py.")
SCORES = {
    "mixture": "J (objective, lower is better) and ratios r_m = RMSE / RMSE of the published setting on "
               "each tuning mixture against the exact flow, fine + confirm draws pooled; for a kept free "
               "grid on the draws the grid search never saw (J_power: the power grid's J there)",
    "trained": "ratios = RMSE / RMSE of the published setting (mixtures against the exact flow, trained "
               "models against their own NFE-200 solution); a searched entry is kept only if every "
               "ratio is <= 1, else the published setting replaces it (rejected: the searched entry)",
    "joint": "ratios = RMSE / RMSE of the published setting on the full batches; written only if every "
             "ratio is <= 1",
}


def read_results(results: Path) -> dict[str, dict | None]:
    """The studies' result files by stage (None where a file is missing; tuning.json is required)."""
    out = {}
    for stage, name in FILES.items():
        path = results / name
        if not path.is_file():
            if stage == "mixture":
                raise FileNotFoundError(f"{path} is missing: run `python -m studies.tuning_study` first")
            out[stage] = None
            continue
        out[stage] = json.loads(path.read_text())
    return out


def mixture_picks(tuning: Mapping) -> dict[int, tuple[Setting, dict]]:
    """Per NFE, the mixture study's own pick and its tuning.json record (after `--evaluate-only` a
    replaced default keeps the study's pick as search.study_setting)."""
    out = {}
    for key, rec in tuning["table"].items():
        search = rec.get("search") or {}
        if "study_setting" in search:
            setting = Setting.coerce(search["study_setting"])
        else:
            setting = Setting(rec["T"], rec["q"], rec["order"], rec.get("fractions"))
        out[int(key)] = (setting, rec)
    return out


def compose(results: Mapping[str, Mapping | None], stages: Sequence[str] = tuple(FILES)) -> dict[int, dict]:
    """The defaults entries {nfe: {"setting": Setting, "source", "stage", "pick", "scores"}} from the
    studies' results, applying `stages` in order (psb_fast/defaults.py has the schema)."""
    entries: dict[int, dict] = {}
    for nfe, (setting, rec) in sorted(mixture_picks(results["mixture"]).items()):
        pick = MIXTURE_PICKS.get(rec.get("source"), "searched")
        scores = _mixture_scores(rec.get("search") or {})
        entries[nfe] = {"setting": setting, "stage": "mixture", "pick": pick,
                        "scores": {"mixture": scores} if scores else {}}
    trained = results.get("trained") if "trained" in stages else None
    for key, r in (trained or {}).get("table", {}).items():
        nfe = int(key)
        checked = Setting.coerce(r["candidates"]["tuned"]["setting"])
        mixture_pick = entries[nfe]["setting"]
        if checked != mixture_pick.effective(nfe):
            raise ValueError(f"tuning_trained.json checked {checked.label} at NFE {nfe}, but the mixture "
                             f"pick is {mixture_pick.label}: rerun `python -m studies.tuning_trained`")
        tuned = _ratios(r["candidates"]["tuned"])
        if r["pick"] == "tuned":
            entries[nfe]["scores"]["trained"] = {"kept": True, "ratios": tuned}
        else:
            scores = {"kept": False, "ratios": _ratios(r["candidates"][r["pick"]]),
                      "rejected": list(checked.as_tuple()), "rejected_ratios": tuned}
            entries[nfe] = {"setting": Setting.coerce(r["setting"]), "stage": "trained", "pick": r["pick"],
                            "scores": {"trained": scores}}
    joint = results.get("joint") if "joint" in stages else None
    for key, r in (joint or {}).get("table", {}).items():
        if r["admissible"]:
            entries[int(key)] = {"setting": Setting.coerce(r["setting"]), "stage": "joint",
                                 "pick": "searched", "scores": {"joint": {"ratios": _ratios(r)}}}
    for nfe, entry in entries.items():
        entry["source"] = "published" if entry["setting"] == published_setting(nfe) else "tuned"
    return entries


def build(results: Mapping[str, Mapping | None]) -> dict:
    """The defaults file's payload (JSON values) from the studies' results."""
    entries = compose(results)
    stages = {}
    for stage, name in FILES.items():
        data = results.get(stage)
        if data is None:
            continue
        problems = data["config"]["tuning"] if stage == "mixture" else data["problems"]
        stages[stage] = {"results": f"benchmarks/results/{name}", "problems": list(problems),
                         "command": f"python -m studies.{SCRIPTS[stage]}", "scores": SCORES[stage]}
    out = {}
    for nfe, e in sorted(entries.items()):
        setting = e["setting"].to_json()
        if e["source"] == "published":  # the loader uses published_setting(nfe) itself
            setting["T"] = round(setting["T"], 10)
        out[str(nfe)] = {"setting": setting, "source": e["source"], "stage": e["stage"], "pick": e["pick"],
                         "scores": e["scores"]}
    return {"format": FORMAT, "command": COMMAND, "about": ABOUT, "stages": stages, "entries": out}


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


def _round(x: float) -> float:
    return round(float(x), DIGITS)


def _ratios(record: Mapping) -> dict[str, float]:
    return {name: _round(r) for name, r in record["ratios"].items()}


def _mixture_scores(search: Mapping) -> dict:
    """The mixture study's scores of its pick: J and per-mixture ratios (of the free grid on unseen
    draws where the free grid was kept)."""
    if not search:
        return {}
    grid = search.get("free_grid")
    if grid and grid["kept"]:
        return {"J": _round(grid["J_check"]["free"]), "J_power": _round(grid["J_check"]["start"]),
                "ratios": _ratios({"ratios": grid["check_ratio"]})}
    return {"J": _round(search["J"]), "ratios": _ratios({"ratios": search["tuning_ratio"]})}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the studies' results folder")
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
