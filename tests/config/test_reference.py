"""The README's config reference is generated from the config models and must be current."""

from pathlib import Path

from copd.config.reference import BEGIN, END, config_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_is_up_to_date():
    text = README.read_text()
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == config_reference().strip(), "run: python -m copd.config.reference README.md"


def test_every_config_key_has_a_description():
    rows = [line for line in config_reference().splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)
