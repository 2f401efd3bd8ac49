"""The documentation's reference pages are made from the code (dnnrun/cli/reference.py) and held
equal to it: a change to an option, an exit code or a run's files without the page fails here."""

from __future__ import annotations

import pytest

from dnnrun.cli import reference
from dnnrun.cli.conf import CONFIG_DIR


@pytest.mark.parametrize("name", reference.PAGES)
def test_the_committed_reference_page_is_what_the_code_makes(name):
    committed = (reference.DOCS / name).read_text()
    assert committed == reference.PAGES[name](), f"run python -m dnnrun.cli.reference to update docs/reference/{name}"


def test_the_options_page_names_every_option_and_the_check_sees_a_stale_page(tmp_path, monkeypatch, capsys):
    page = reference.options_page()
    for path in CONFIG_DIR.glob("*/*.yaml"):
        if path.parent.name != "hydra":
            assert f"| `{path.stem}` |" in page, path
    (adam,) = [line for line in page.splitlines() if line.startswith("| `adam` |")]
    assert "`lr=0.001`" in adam and "`betas=[0.9, 0.999]`" in adam  # its parameters with their defaults
    monkeypatch.setattr(reference, "DOCS", tmp_path)
    assert reference.main(["--check"]) == 1
    assert "docs/reference/options.md differs from the code" in capsys.readouterr().err
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0
