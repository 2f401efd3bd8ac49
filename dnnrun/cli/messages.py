"""How the command line shows what went wrong: one `error: ...` line on stderr, and the real
message of an exception that Hydra wrapped."""

from __future__ import annotations


def error(message: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def explain(exc: BaseException) -> str:
    """Hydra often wraps the real error (an OmegaConf one) in an exception with a vague message."""
    text = str(exc).strip()
    cause = str(exc.__cause__).strip() if exc.__cause__ is not None else ""
    if cause and cause not in text:
        text = f"{text}: {cause}" if text else cause
    return text or type(exc).__name__
