"""The README's Python blocks run as written, each in a fresh interpreter; its test command prints
pytest's summary line (no doubled -q between the command and pyproject's addopts)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
@pytest.mark.slow
def test_python_block_runs(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"README block {index} failed:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"


def test_test_command_is_not_doubly_quiet():
    command = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", README).group(1)
    found = re.search(r'^addopts\s*=\s*"(.*)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    addopts = found.group(1) if found else ""
    quiet = command.split("pytest", 1)[1].split().count("-q") + addopts.split().count("-q")
    assert quiet <= 1, "pytest at -qq prints no pass/fail summary line"


# ---------------------------------------------------------------- shell commands
# Every command of a ```bash block runs as written in these tests, or (long runs) has its arguments
# parsed and validated by the real parser without doing the work; install steps (pip, venv) are
# checked for what they install. A block preceded by <!-- excerpt --> is exempt; the test command
# is what CI runs.
BASH_BLOCKS = re.findall(r"(<!-- [a-z-]+ -->\n)?```bash\n(.*?)^```", README, flags=re.S | re.M)
SETUP = ("pip", "python3", ".", "source")  # python3 -m venv; the installs are checked below


def _commands() -> list[list[str]]:
    import shlex

    out = []
    for marker, block in BASH_BLOCKS:
        if marker:
            continue
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" # ")[0].split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                argv = shlex.split(part.split(" > ")[0])
                if argv and argv[0] not in SETUP:
                    out.append(argv)
    return out


COMMANDS = _commands()
# parse_args with the real parser, then stop before any work (a required option missing fails here)
DRY_RUN = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def dry(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = dry
kind, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


def test_readme_has_shell_commands():
    names = {argv[0] for argv in COMMANDS}
    assert {"psb-fast", "torchrun", "python"} <= names, names


@pytest.mark.parametrize("argv", [a for a in COMMANDS if a[0] == "psb-fast"], ids=" ".join)
def test_psb_fast_command_parses_and_validates(argv, tmp_path, monkeypatch):
    from psb_fast.cli import build_parser
    from psb_fast.config import apply_overrides, load_config

    monkeypatch.chdir(ROOT)
    args = build_parser().parse_args(argv[1:])
    if args.command == "train":  # the config and every --set, as train validates them
        cfg = load_config(args.config)
        apply_overrides(cfg, args.set)
    if args.command == "config":
        from psb_fast.cli import main

        assert main(["config"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("argv", [a for a in COMMANDS if a[0] in ("python", "torchrun")], ids=" ".join)
def test_python_command_parses(argv):
    if argv[0] == "torchrun":  # torchrun's own options, then -m MODULE ...
        argv = ["python", *argv[argv.index("-m"):]]
    kind, target, rest = ("module", argv[2], argv[3:]) if argv[1] == "-m" else ("path", argv[1], argv[2:])
    if kind == "module" and target.startswith("psb_fast.cli"):
        from psb_fast.cli import build_parser

        build_parser().parse_args(rest)
        return
    done = subprocess.run([sys.executable, "-c", DRY_RUN, kind, target, *rest], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stderr[-3000:]}"


def test_own_data_block_is_what_the_example_script_runs():
    """The README's own-data commands are examples/own_data.sh's, options for options."""
    import shlex

    script = (ROOT / "examples" / "own_data.sh").read_text().replace("\\\n", " ").replace('"', "")
    values = {"$WORK": "WORK", "$STEPS": "600", "$CONFIG": "CONFIG", "$DATA": "WORK/images"}
    for variable, value in values.items():
        script = script.replace(variable, value)
    block = next(b for _, b in BASH_BLOCKS if "images:WORK/images" in b).replace("\\\n", " ")
    ours = [line.split(" # ")[0].strip() for line in block.splitlines() if line.startswith("psb-fast")]
    theirs = [line[line.index("psb-fast"):] for line in script.splitlines() if " psb-fast " in line]

    def options(line: str) -> set[str]:
        words = shlex.split(line.replace("examples/configs/images.toml", "CONFIG"))
        return {f"{a} {b}" if b and not b.startswith("-") else a
                for a, b in zip(words, [*words[1:], ""], strict=True)}

    assert len(ours) == len(theirs) == 4
    for mine, script_line in zip(ours, theirs, strict=True):
        assert options(mine) == options(script_line), (mine, script_line)


def test_install_commands_use_the_cpu_wheel_on_cpu_and_no_extras_for_the_demo():
    demo = [b for marker, b in BASH_BLOCKS if not marker and "psb-fast demo" in b]
    cpu = [b for b in demo if "download.pytorch.org/whl/cpu" in b]
    assert len(demo) == 2 and len(cpu) == 1 and all('pip install -e . &&' in b for b in demo)


def test_extras_never_pull_a_package_that_replaces_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned_to_a_torch = ("k-diffusion", "torchvision", "torchaudio", "xformers")
    for name, requirements in project["optional-dependencies"].items():
        for requirement in requirements:
            assert not requirement.lower().startswith(pinned_to_a_torch), (name, requirement)
    assert not any(r.startswith("triton") for r in project["dependencies"])
    assert "py.typed" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["psb_fast"]
    assert (ROOT / "psb_fast" / "py.typed").exists() and (ROOT / "LICENSE").read_text().startswith("MIT")
