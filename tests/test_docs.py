"""The documentation's reference pages are made from the code (dnnrun/cli/reference.py) and held
equal to it: a change to an option, an exit code or a run's files without the page fails here. And
every dnnrun command the README and the guide show passes dnnrun's own checks."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dnnrun.cli import reference
from dnnrun.cli.checks import preflight
from dnnrun.cli.conf import CONFIG_DIR
from dnnrun.cli.help import group_options

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", reference.PAGES)
def test_the_committed_reference_page_is_what_the_code_makes(name):
    committed = (reference.DOCS / name).read_text()
    assert committed == reference.PAGES[name](), f"run python -m dnnrun.cli.reference to update docs/reference/{name}"


def test_the_options_page_names_every_option_and_the_check_sees_a_stale_page(tmp_path, monkeypatch, capsys):
    page = reference.options_page()
    for group in (p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        for option, path in group_options(group):  # experiment: chapter/prelu too
            assert f"| `{option}` |" in page, path
    (adam,) = [line for line in page.splitlines() if line.startswith("| `adam` |")]
    assert "`lr=0.001`" in adam and "`betas=[0.9, 0.999]`" in adam  # its parameters with their defaults
    monkeypatch.setattr(reference, "DOCS", tmp_path)
    assert reference.main(["--check"]) == 1
    assert "docs/reference/options.md differs from the code" in capsys.readouterr().err
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0


def _commands(text: str) -> list[tuple[str, str | None]]:
    """The dnnrun command lines of a page, each with the error the page shows it printing (None
    when it shows none): every `dnnrun ...` line of a bash block; the `$ dnnrun ...` lines of a text
    block, whose other lines are what the command printed (an `error: ...` line right after it: the
    refusal it shows); and the commands in tables' cells (`dnnrun experiment=chapter/prelu`). Prose
    may show a command with a placeholder: it is not checked."""
    found = []
    for language, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
        for line, after in zip(lines, [*lines[1:], ""]):
            if language == "text" and not line.startswith("$ "):
                continue
            line = line.removeprefix("$ ")
            if line.startswith("dnnrun ") and language in ("bash", "text"):
                found.append((line, after.removeprefix("error: ") if after.startswith("error: ") else None))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    rows = "\n".join(line for line in prose.splitlines() if line.startswith("|"))
    return found + [(command, None) for command in re.findall(r"`(dnnrun [^`]+)`", rows)]


PAGES_WITH_COMMANDS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS, ids=lambda p: p.name)
def test_every_dnnrun_command_of_the_readme_and_the_guide_passes_dnnrun_s_checks(page, tmp_path, monkeypatch):
    """As printed: each command composes and passes the checks a run makes before it starts
    (options, keys, values, sweeps), so a renamed option or key fails here, not for a reader."""
    monkeypatch.chdir(tmp_path)
    commands = _commands(page.read_text())
    if page.name in ("README.md", "getting-started.md", "walkthrough.md", "chapter.md"):
        assert commands, f"{page.name} shows no dnnrun command"
    for line, printed in commands:
        if "rerun=" in line:
            continue  # the overrides of a run that exists only on the reader's machine
        problems = preflight(shlex.split(line, comments=True)[1:]).problems
        if printed is None:
            assert not problems, f"{page.name}: {line}\n{problems}"
        elif problems:  # a refusal the page shows: in those words (one that needs the reader's files comes later)
            assert str(problems[0]) == printed, f"{page.name}: {line}\n{problems}"


def test_the_command_check_reads_commands_as_a_reader_would_and_catches_a_stale_one(tmp_path, monkeypatch):
    page = "```bash\ndnnrun optimizer=adamm   # a comment\ndnnrun-report outputs\n```\n"
    page += "```text\n$ dnnrun act=elu \\\n    trainer.epochs=2\ndnnrun 0.1.0 (printed)\n"
    page += "$ dnnrun act=eluu\nerror: no\n```\n"
    assert _commands(page) == [
        ("dnnrun optimizer=adamm   # a comment", None),
        ("dnnrun act=elu      trainer.epochs=2", None),
        ("dnnrun act=eluu", "no"),
    ]
    monkeypatch.chdir(tmp_path)
    (stale, fine, _) = (preflight(shlex.split(line, comments=True)[1:]).problems for line, _ in _commands(page))
    assert "did you mean 'adam'" in stale[0] and not fine
