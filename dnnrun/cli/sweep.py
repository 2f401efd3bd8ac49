"""The end of a sweep: sweep.csv rewritten, every job that did not complete listed, and a non-zero
exit when there was one; also when the launcher broke before that end (e.g. joblib, when a
worker process is killed), recording the jobs whose process died."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dnnrun.cli.messages import error
from dnnrun.cli.status import record_end
from dnnrun.errors import EXIT_INTERNAL, RunError
from dnnrun.store.rundir import ENDED_WELL, RunDir, SweepDir

DIED = "its process died before it finished (killed?)"


class SweepFailed(SystemExit):
    """Some job of a sweep did not complete (exit code 1): raised by SweepReport once it has said
    which, so that the command line tells it from a launcher that broke."""

    def __init__(self) -> None:
        super().__init__(EXIT_INTERNAL)


class SweepReport(Callback):
    """Hydra's callback at the end of a sweep (conf/config.yaml: hydra.callbacks.sweep_report)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from dnnrun.cli.search import SWEEPER

        shared = OmegaConf.select(config, "hydra.sweeper._target_") == SWEEPER  # a search: other processes' jobs too
        if report_sweep(Path(config.hydra.sweep.dir), shared):
            raise SweepFailed()


def report_sweep(sweep_dir: Path, shared: bool = False) -> bool:
    """Rewrite sweep.csv and print how many jobs completed and every one that did not; whether one
    did not. shared: a search's sweep directory, which other processes of the search share (their
    jobs still running are theirs, not failures)."""
    sweep = SweepDir(sweep_dir)
    try:
        rows = sweep.update_table()
    except RunError as exc:  # a full or read-only disk: the jobs' own records stand
        error(str(exc))
        return True
    # another process's job, in a sweep directory that processes of one search share
    running = [r for r in rows if shared and r["status"] not in ENDED_WELL and RunDir(r["run_dir"]).in_use()]
    failed = [r for r in rows if r["status"] not in ENDED_WELL and r not in running]
    pruned = sum(r["status"] == "pruned" for r in rows)
    completed = sum(r["status"] == "completed" for r in rows)
    print(
        f"sweep: {completed} of {len(rows)} jobs completed"
        + (f", {pruned} pruned" if pruned else "")
        + (f", {len(running)} running in another process" if running else "")
        + f"; table: {sweep.table}"
    )
    for row in failed:
        error(
            f"job {row['job']} ({row['overrides'] or 'no overrides'}): {row['status']}"
            + (f": {row['error']}" if row.get("error") else "")
        )
    return bool(failed)


def sweep_broke(sweep_dir: Path, launcher: str, began: bool) -> bool:
    """After the launcher of a sweep raised, before the sweep's end (Hydra calls no on_multirun_end
    then): the jobs whose process died left no status.json; they are recorded as failed, and the
    sweep is reported as SweepReport would. False when no job had begun (no job directory, and
    `began` false: no job ran in this process): Hydra could not compose a job's config (bad input;
    it has printed why). launcher: the `_target_` of the sweep's launcher."""
    jobs = SweepDir(sweep_dir).jobs()
    if not jobs and not began:
        return False
    # A Slurm job (submitit) outlives a failure of the launcher that waits for it: it records its own end.
    remote = "submitit" in launcher
    for job in jobs if not remote else []:
        if not job.status.exists():
            snapshot = job.snapshot("overrides")
            overrides = OmegaConf.to_container(OmegaConf.load(snapshot)) if snapshot.is_file() else []
            number = job.path.name.split("_", 1)[0]
            record_end(
                job,
                EXIT_INTERNAL,
                RunError(DIED),
                {"num": int(number) if number.isdigit() else None, "overrides": overrides},
            )
    report_sweep(sweep_dir)
    error(
        f"the sweep stopped before its end (the error above); jobs that had not begun have no directory in {sweep_dir}"
    )
    return True
