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


def test_the_setup_installs_what_the_optional_tests_import():
    """The README's set-up installs the dev extra; it must hold the optional extras whose tests
    would otherwise skip (lm-eval, W&B offline, the plots, DeepSpeed)."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    extras = next(k.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for k in node.keywords if k.arg == "extras_require")
    dev = ast.literal_eval(extras)["dev"]
    names = {requirement.split("=")[0].split(">")[0] for requirement in dev}
    assert {"lm-eval", "wandb", "matplotlib", "deepspeed", "pytest"} <= names, dev
    readme = _commands((REPO / "README.md").read_text())
    assert readme[readme.index("```bash") + 1].endswith('pip install -e ".[dev]"')
