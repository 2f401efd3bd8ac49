"""The documentation's reference pages, made from the code so that they cannot drift from it:
every option of every group with its parameters and defaults (conf/, as `dnnrun --help` reads
it), the exit codes (errors.EXIT_CODES), the files of a run and a sweep directory
(store/rundir.py), and when each rule of the diagnosis speaks and what it suggests
(insight/diagnosis.py). tests/test_docs.py fails when the committed pages differ from what this makes.

    python -m dnnrun.cli.reference            write docs/reference/*.md
    python -m dnnrun.cli.reference --check    exit 1 and name the pages that differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dnnrun.cli.conf import CONFIG_DIR
from dnnrun.cli.help import GROUP_HELP, group_options, option_line, settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reference"
NOTICE = "<!-- Made by `python -m dnnrun.cli.reference` from the code: edit the code, not this page. -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_page() -> str:
    defaults: dict[str, object] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    lines = [
        NOTICE,
        "",
        "# Options",
        "",
        "Every option of every config group, with the parameters its YAML file sets and their defaults.",
        "Pick an option with `GROUP=OPTION` and change a parameter with `GROUP.KEY=VALUE`",
        "(`optimizer=adam optimizer.lr=3e-4`); `dnnrun --help` lists the same in the terminal.",
    ]
    for group in [g for g in GROUP_HELP if (CONFIG_DIR / g).is_dir()]:
        default = defaults.get(group)
        default = ",".join(default) if isinstance(default, list) else default
        lines += ["", f"## {group}", "", GROUP_HELP[group] + (f" (default: `{default}`)." if default else ".")]
        lines += ["", "| option | what it is | parameters (defaults) |", "| --- | --- | --- |"]
        for option, path in group_options(group):
            keys = [key for _, _, found in settings(path) for key, _ in found]
            keys = [k for k in keys if k.partition("=")[0] not in ("option", "name")]
            shown = "<br>".join(f"`{_cell(k)}`" for k in keys) if group != "experiment" else "(several groups)"
            lines.append(f"| `{option}` | {_cell(option_line(path))} | {shown or '-'} |")
    lines += ["", "## Settings outside the groups", "", "| setting (default) | what it does |", "| --- | --- |"]
    for _, about, keys in settings():
        for key, text in keys:
            lines.append(f"| `{_cell(key)}` | {_cell(text or about)} |")
    return "\n".join(lines) + "\n"


def exit_codes_page() -> str:
    from dnnrun.errors import EXIT_CODES

    lines = [NOTICE, "", "# Exit codes", "", "| code | meaning |", "| --- | --- |"]
    lines += [f"| {code} | {_cell(meaning)} |" for code, meaning in EXIT_CODES.items()]
    lines += ["", "Every run and sweep job also records its ending in `status.json` (and `summary.json`)."]
    return "\n".join(lines) + "\n"


def run_directory_page() -> str:
    from dnnrun.store.rundir import RUN_FILES, SWEEP_FILES

    lines = [NOTICE, "", "# The run directory", "", "Each run writes only inside its own directory:", ""]
    lines += ["| file | what it holds |", "| --- | --- |"]
    lines += [f"| `{_cell(name)}` | {_cell(what)} |" for name, what in RUN_FILES]
    lines += ["", "A sweep directory holds its jobs' run directories and these files:", ""]
    lines += ["| file | what it holds |", "| --- | --- |"]
    lines += [f"| `{_cell(name)}` | {_cell(what)} |" for name, what in SWEEP_FILES]
    return "\n".join(lines) + "\n"


def diagnosis_page() -> str:
    from dnnrun.insight.diagnosis import REMEDIES, WHEN

    lines = [NOTICE, "", "# The diagnosis: which remedy for which problem", ""]
    lines += [
        "At the end of every run each rule below looks at `metrics.jsonl` and `diagnostics.jsonl`; one whose",
        "numbers cross its threshold adds a sentence to the diagnosis (the terminal and `summary.json`), followed",
        "by a `try:` line of these overrides, in this order, ready to paste. A healthy run gets none.",
        "",
        "| rule | speaks when | try |",
        "| --- | --- | --- |",
    ]
    for rule, remedies in REMEDIES.items():
        tried = "<br>".join(
            f"`{_cell(' '.join(r.overrides))}`" + (f" ({_cell(r.note)})" if r.note else "") for r in remedies
        )
        lines.append(f"| {rule.replace('_', ' ')} | {_cell(WHEN[rule])} | {tried} |")
    return "\n".join(lines) + "\n"


PAGES = {
    "options.md": options_page,
    "exit-codes.md": exit_codes_page,
    "run-directory.md": run_directory_page,
    "diagnosis.md": diagnosis_page,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dnnrun.cli.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a page differs")
    args = parser.parse_args(argv)
    stale = [name for name, make in PAGES.items() if not (DOCS / name).is_file() or (DOCS / name).read_text() != make()]
    if args.check:
        for name in stale:
            print(f"docs/reference/{name} differs from the code: run python -m dnnrun.cli.reference", file=sys.stderr)
        return 1 if stale else 0
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (DOCS / name).write_text(PAGES[name]())
        print(f"wrote docs/reference/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
