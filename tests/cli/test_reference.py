"""The docs' config reference page is generated from the config models and must be current."""

from pathlib import Path

from copd.cli.reference import BEGIN, END, PAGE, config_reference

REFERENCE = Path(__file__).resolve().parents[2] / PAGE


def test_config_reference_page_is_up_to_date():
    text = REFERENCE.read_text()
    assert BEGIN in text and END in text, f"{PAGE} has lost its markers"
    current = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == config_reference().strip(), "run: python -m copd.cli.reference"


def test_every_config_key_has_a_description():
    rows = [line for line in config_reference().splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)


def test_the_verifier_key_lists_the_registered_verifiers():
    from copd.capabilities.verifiers import VERIFIERS

    row = next(line for line in config_reference().splitlines() if line.startswith("| `capabilities.verifier`"))
    assert f"registered: {', '.join(VERIFIERS)}" in row
