"""CI runs exactly the README's set-up and test commands."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_command_after(heading: str, text: str) -> str:
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    setup, test = _first_command_after("Set up", readme), _first_command_after("Test", readme)
    assert setup in ci, f"CI does not run the README's set-up command {setup!r}"
    assert test in ci, f"CI does not run the README's test command {test!r}"
    assert ci.index(setup) < ci.index(test)


def test_the_usage_snippet_runs_as_pasted():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "auto runs 'torch'" in out.stdout  # on the CPU, as the README says
