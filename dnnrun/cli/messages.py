"""How the command line shows what went wrong: one `error: ...` line on stderr, and the real
message of an exception that Hydra wrapped."""

from __future__ import annotations

import os
import sys


def error(message: str) -> None:
    """`error: message` on stderr; `error:` in bold red on a terminal (unless NO_COLOR is set)."""
    color = sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    print(f"\x1b[1;31merror:\x1b[0m {message}" if color else f"error: {message}", file=sys.stderr, flush=True)


def explain(exc: BaseException) -> str:
    """Hydra often wraps the real error (an OmegaConf one) in an exception with a vague message."""
    text = str(exc).strip()
    cause = str(exc.__cause__).strip() if exc.__cause__ is not None else ""
    if cause and cause not in text:
        text = f"{text}: {cause}" if text else cause
    return text or type(exc).__name__
