"""dpdispatcher's jobs across a killed driver, and one message for a job that keeps failing.

Two things dpdispatcher 1.1.0 leaves to its caller, added around every submission of
``alkpu run`` (both modes) by :func:`guard_jobs`:

* **Resuming after a kill.** A submission's state (job ids, fail counts) is saved in
  ``<remote_root>/<submission hash>.json`` only after all its jobs were submitted. A job of
  the Shell machine outlives a driver killed alone (it is started with ``nohup``; a kill of
  the driver's whole process group ends it too). On recovery, before anything is submitted,
  each unfinished Shell job is looked for among the running processes (its script's name,
  under the submission's directory): one that runs is that job and is waited for, never
  submitted a second time into its directory, whether or not its id was saved. One that no
  longer runs and neither finished nor failed (its fail flag is not set: it was killed) is
  submitted again without counting as one of its ``retry_count`` failures. For other batch
  systems the id in ``<job hash>_job_id`` (written right after submission) is taken when the
  saved state lacks it.
* **A job that keeps failing.** dpdispatcher retries a job that ends with an error
  ``retry_count`` times (machine.json, default 3) and then raises a RuntimeError that
  names a hash. :class:`JobFailedError` says instead which step and task failed, in which
  directory, where its log is and what it ends with.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

__all__ = ["JobFailedError", "FailedLabelsError", "guard_jobs", "adopt_recorded_jobs", "missing_outputs_allowed"]

_STEP_OF_DIR = {"00.train": "run_train", "01.model_devi": "run_model_devi", "02.fp": "run_fp"}


class JobFailedError(RuntimeError):
    """A job failed after dpdispatcher's retries; the message names it, its directory and log."""


class FailedLabelsError(RuntimeError):
    """More labelling tasks than ``ratio_failed`` gave no labels (DP-GEN's post_fp check)."""


def _read(context, name: str) -> str | None:
    try:
        if context.check_file_exists(name):
            text = context.read_file(name)
            return text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    except (OSError, AttributeError):  # (a context not bound to a submission)
        pass
    return None


def _script_process(context, job):
    """Whether the process running this job's script under this submission's directory could be
    looked for, and its id if one runs (found by its command line and working directory, not by
    a recorded id: a job started just before the driver was killed has none recorded, and the ids
    of dead processes are reused). The script moves into its task directories as it goes."""
    name = job.script_file_name  # ".<job hash>.sub"
    pattern = "[.]" + re.escape(name.lstrip("."))  # a pattern that does not match this command itself
    cmd = ("command -v pgrep >/dev/null && test -d /proc/self || exit 7; here=$(pwd -P); "
           f"for p in $(pgrep -f {shlex.quote(pattern)}); do "
           'case "$(readlink /proc/$p/cwd)" in "$here"|"$here"/*) echo "$p $(ps -o ppid= -p $p)";; esac; done; true')
    try:
        ret, _, stdout, _ = context.block_call(cmd)
    except Exception:  # noqa: BLE001 - cannot look: dpdispatcher's own recovery
        return False, None
    if ret != 0:
        return False, None
    rows = [ln.split() for ln in stdout.read().decode("utf-8", "replace").splitlines() if len(ln.split()) == 2]
    pids = {pid for pid, _ in rows}
    top = [pid for pid, ppid in rows if ppid not in pids]  # the script, not its subshells
    return True, (top[0] if top else None)


def adopt_recorded_jobs(submission) -> None:
    """After dpdispatcher's own recovery: a job whose script still runs is that job (never
    submitted again); one that was killed with the driver is submitted again uncounted."""
    from dpdispatcher.machines.shell import Shell
    from dpdispatcher.utils.job_status import JobStatus

    machine = submission.machine
    context = machine.context
    shell = isinstance(machine, Shell)
    for job in submission.belonging_jobs:
        if job.job_state in (JobStatus.finished, JobStatus.failed):
            continue
        recorded = (_read(context, f"{job.job_hash}_job_id") or "").strip()
        if not shell:
            if recorded and str(job.job_id) != recorded:  # submitted, but the driver died before saving it
                job.job_id = recorded
            continue
        known, running = _script_process(context, job)
        if not known:
            continue
        if running is not None:
            job.job_id = int(running)
            job.job_state = JobStatus.running
            continue
        if context.check_file_exists(f"{job.job_hash}_job_tag_finished"):
            job.job_id = job.job_id or (int(recorded) if recorded.isdigit() else 1)  # so its tag is read
            continue
        failed = (_read(context, f"{job.job_hash}_flag_if_job_task_fail") or "").strip() == "1"
        if failed and job.job_id not in ("", None):
            continue  # it ended with an error: dpdispatcher counts it and retries
        job.job_id = ""  # never started, or killed with the driver: not one of its failures
        job.job_state = JobStatus.unsubmitted


def _excerpt(context, name: str, lines: int = 8) -> str:
    """The last lines of the file ``name`` under the submission's (remote) directory."""
    text = (_read(context, name) or "").rstrip().splitlines()[-lines:]
    return "\n".join("    " + ln for ln in text)


def describe_failure(submission, cause: BaseException) -> str | None:
    """One message for the jobs of ``submission`` that failed (None if none did)."""
    from dpdispatcher.utils.job_status import JobStatus

    machine = submission.machine
    context = machine.context
    jobs = [j for j in submission.belonging_jobs if j.job_state in (JobStatus.terminated, JobStatus.failed)]
    if not jobs:
        return None
    work_base = Path(submission.work_base)
    parts = work_base.parts
    iteration = next((p for p in parts if re.fullmatch(r"iter\.\d+", p)), None)
    step = next((_STEP_OF_DIR[p] for p in parts if p in _STEP_OF_DIR), "a step")
    where = f"{step} of iteration {int(iteration.split('.')[1])}" if iteration else step
    remote = Path(context.remote_root)
    retry = getattr(machine, "retry_count", 3)
    lines = [f"{where} stopped: {len(jobs)} job(s) failed and were retried {retry} time(s) "
             f"(machine.json's retry_count):"]
    for job in jobs:
        for task in job.job_task_list:
            if context.check_file_exists(os.path.join(task.task_work_path,
                                                      f"{task.task_hash}_task_tag_finished")):
                continue  # this task of the job finished
            local = work_base / task.task_work_path
            log = remote / task.task_work_path / (task.errlog or task.outlog or "")
            lines.append(f"  task {task.task_work_path}: `{task.command}` in {local} (run in "
                         f"{remote / task.task_work_path}); its log {log} ends with:")
            lines.append(_excerpt(context, os.path.join(task.task_work_path, task.errlog or task.outlog or ""))
                         or "    (the log is empty or could not be read)")
    lines.append(f"Fix the cause, then run the same command again (`alkpu run` or `dpgen run`): record.dpgen ends "
                 f"at the last finished step, so it continues with {where}; jobs that finished are not run again.")
    return "\n".join(lines)


@contextlib.contextmanager
def guard_jobs():
    """Patch dpdispatcher's Submission for the loop: adopt recorded jobs on recovery, and
    raise :class:`JobFailedError` for a job that keeps failing."""
    from dpdispatcher import Submission

    recover, run = Submission.try_recover_from_json, Submission.run_submission

    def try_recover_from_json(self, *args, **kwargs):
        out = recover(self, *args, **kwargs)
        adopt_recorded_jobs(self)
        return out

    def run_submission(self, *args, **kwargs):
        try:
            return run(self, *args, **kwargs)
        except RuntimeError as exc:
            if isinstance(exc, JobFailedError):
                raise
            text = describe_failure(self, exc)
            if text is None:
                raise
            raise JobFailedError(text) from exc

    Submission.try_recover_from_json, Submission.run_submission = try_recover_from_json, run_submission
    try:
        yield
    finally:
        Submission.try_recover_from_json, Submission.run_submission = recover, run


@contextlib.contextmanager
def missing_outputs_allowed():
    """Within: a task that finished (its command exited 0) without writing one of its
    backward files is downloaded without it instead of stopping the step with
    FileNotFoundError. For labelling this is DP-GEN's failed label: post_fp collects the
    tasks that have output and stops when more than ``ratio_failed`` of them have none."""
    from dpdispatcher import Submission

    original = Submission.download_jobs

    def download_jobs(self, include_failed: bool = False):
        if include_failed or self.failed_jobs():
            return original(self, include_failed=include_failed)
        self._require_machine().context.download(self, check_exists=True, mark_failure=False)

    Submission.download_jobs = download_jobs
    try:
        yield
    finally:
        Submission.download_jobs = original
