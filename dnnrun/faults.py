"""Fault injection for tests: DNNRUN_FAULT=KIND@WHEN makes a run fail on purpose.

KIND is `nan` (the loss becomes NaN) and WHEN is `step=N` (the N-th optimizer step of the run,
counting from 1). Unset, it costs one comparison per step.
"""

from __future__ import annotations

import dataclasses
import os
import re

from dnnrun.errors import UserError

KINDS = ("nan",)


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    step: int


def from_env() -> Fault | None:
    spec = os.environ.get("DNNRUN_FAULT", "").strip()
    if not spec:
        return None
    match = re.fullmatch(r"(\w+)@step=(\d+)", spec)
    if not match or match[1] not in KINDS:
        raise UserError(f"DNNRUN_FAULT={spec!r}: expected KIND@step=N with KIND one of {', '.join(KINDS)}")
    return Fault(match[1], int(match[2]))
