"""The README's hyperparameter table is the user's reference: it must match the contract."""

import re
from pathlib import Path

from dogbreed import contract

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_hyperparameter_is_documented_with_its_default():
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| `([^`]*)` \|", README.read_text(), flags=re.M))
    defaults = contract.Hyperparameters().to_sagemaker()
    documented = {name: rows[name] for name in defaults if name in rows}
    assert documented == defaults, "README hyperparameter table is out of date"


def test_readme_shows_the_setup_and_test_commands():
    first_screen = "\n".join(README.read_text().splitlines()[:12])
    assert all(f"make {target}" in first_screen for target in ("install", "demo", "test"))
