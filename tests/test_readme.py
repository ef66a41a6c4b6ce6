"""The README's commands are the ones CI runs."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in text.splitlines()]


def test_ci_runs_the_readme_setup_and_test_commands():
    readme = _commands((REPO / "README.md").read_text())
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci == ["pip install torch==2.13.0 && pip install -e \".[dev]\"", "python -m pytest -q tests"]
    first_block = readme[readme.index("```bash") + 1:][:2]
    assert first_block == [ci[0], "megalong demo"]  # the README starts with set-up, then the main job
    assert ci[1] in readme  # ... and gives the test command
