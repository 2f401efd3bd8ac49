"""How a run's end is recorded: its status.json (RunDir.write_status), which sweeps read."""

from __future__ import annotations

from dnnrun.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    Diverged,
    Interrupted,
    Pruned,
    RunError,
    UserError,
)
from dnnrun.store.rundir import RunDir

STATUS_OF_EXIT = {
    EXIT_OK: "completed",
    EXIT_DIVERGED: "diverged",
    EXIT_INTERRUPTED: "interrupted",
    EXIT_TERMINATED: "interrupted",
}  # any other code: "failed"; a pruned trial (exit 0): "pruned"


def record_end(run: RunDir, code: int, failure: BaseException | None, job: dict) -> None:
    """Write how the run ended. job: {"num": the job's number in its sweep or None, "overrides": [...]}."""
    from dnnrun.training import faults

    injected = faults.from_env()
    try:
        if injected is not None:  # tests: a signal, or a full disk, while the end is recorded
            injected.at("status", 1)
        status = "pruned" if isinstance(failure, Pruned) else STATUS_OF_EXIT.get(code, "failed")
        run.write_status(status, code, job, failure_text(failure))
    except (OSError, RunError) as exc:  # a read-only or full directory: said once, the run's own exit code stands
        from dnnrun.cli.messages import error

        why = exc.strerror if isinstance(exc, OSError) else str(exc).rpartition(": ")[2]
        error(f"cannot record how the run ended in {run.status}: {why or exc}")


def failure_text(failure: BaseException | None) -> str | None:
    """What status.json says went wrong: dnnrun's own errors by their message, a bug with its type."""
    if failure is None:
        return None
    if isinstance(failure, KeyboardInterrupt):
        return "interrupted"
    if isinstance(failure, Pruned):  # not a failure: summary.json's stop_reason says where it stopped
        return None
    if isinstance(failure, (UserError, Diverged, RunError, Interrupted)):
        return str(failure)
    return f"{type(failure).__name__}: {failure}"
