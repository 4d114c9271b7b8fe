"""README's "Install into an existing environment" commands are the ones CI (.ci/run) runs, in order."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Install into an existing environment", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_install_commands_are_what_ci_runs_in_that_order():
    readme, ci = _readme_commands(), _ci_commands()
    assert len(readme) >= 6 and any("tiatoolbox" in c for c in readme) and any("napari" in c for c in readme)
    positions = []
    for command in readme:
        assert command in ci, f"README command not run by .ci/run: {command}"
        positions.append(ci.index(command))
    assert positions == sorted(positions), "README and .ci/run run the commands in different orders"


def test_readme_tiatoolbox_pin_is_the_extra():
    extra = re.search(r'^tiatoolbox = \["(tiatoolbox[^"]*)"', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert extra and f'python -m pip install "{extra.group(1)}"' in _readme_commands()
