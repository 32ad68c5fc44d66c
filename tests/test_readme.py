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
