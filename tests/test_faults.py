"""Faults a run must survive: damaged files named before they are used, every file written
atomically, a kill at any moment (test_alkpu_run.py and conftest.py's ``finished_run``)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alkpu_plugin.atomic import atomic_output, atomic_write
from alkpu_plugin.kpu_engine import InputError, KPUResult
from alkpu_plugin.model_devi import ModelDeviError, read_model_devi, write_result

PACKAGE = Path(__file__).resolve().parent.parent / "alkpu_plugin"
ALKPU = str(Path(sys.executable).parent / "alkpu")


def small_result(frames=4, atoms=3, seed=0):
    rng = np.random.default_rng(seed)
    return KPUResult(np.arange(frames), np.arange(frames) * 10, rng.random(frames), rng.random(frames),
                     rng.random((frames, atoms)), {"a": 2.0, "b": 0.01}, {"seed": 0}, rng.random((frames, 9)),
                     [""] * frames)


# ------------------------------------------------------------------ atomic writes
def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.npz"
    target.write_bytes(b"old, complete")
    code = ("import sys, time; from alkpu_plugin.atomic import atomic_write\n"
            "def writer(fh):\n    fh.write(b'x' * 1000000); fh.flush(); print('writing', flush=True); time.sleep(60)\n"
            f"atomic_write({str(target)!r}, writer)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old, complete"
    (leftover,) = [p for p in tmp_path.iterdir() if p != target]  # the temporary file, never the name
    assert re.fullmatch(r"\.state\.npz\..*\.tmp", leftover.name) and leftover.stat().st_size == 1000000


def test_a_failed_write_keeps_the_old_file_or_directory(tmp_path):
    target = tmp_path / "model_devi.out"
    target.write_text("old\n")

    def broken(fh):
        fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken, binary=False)
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["model_devi.out"]
    # a directory output (a deepmd/npy system): replaced only once the new one is complete
    out = tmp_path / "labelled"
    out.mkdir()
    (out / "type.raw").write_text("0\n")

    def half_system(path):
        os.makedirs(path)
        Path(path, "type.raw").write_text("1\n")
        raise FloatingPointError("the calculator returned a non-finite energy")

    with pytest.raises(FloatingPointError):
        atomic_output(out, half_system)
    assert (out / "type.raw").read_text() == "0\n" and sorted(os.listdir(tmp_path)) == ["labelled", "model_devi.out"]

    def whole_system(path):
        os.makedirs(path)
        Path(path, "type.raw").write_text("1\n")

    atomic_output(out, whole_system)
    assert os.listdir(out) == ["type.raw"] and (out / "type.raw").read_text() == "1\n"
    assert sorted(os.listdir(tmp_path)) == ["labelled", "model_devi.out"]


# every way of writing a file, and the writes that may use it: the atomic helpers themselves,
# writes into a file object they hand out (fh), a temporary file only the process reads, and
# DeePMD-kit's lcurve.out, which its trainer appends to line by line as DeePMD-kit does, and the
# RLEKF per-update trace a user asks for with ALKPU_RLEKF_TRACE, appended the same way
WRITES = re.compile(r"open\([^)]*[\"'][wa]b?[\"']|\.write_text\(|\.write_bytes\(|np\.save\(|np\.savez(_compressed)?\(|"
                    r"json\.dump\(|\.savefig\(|\.symlink_to\(|\.to\(\s*([\"'](deepmd|vasp|lammps)|\w+\.output_fmt)")
ALLOWED = {
    ("atomic.py", "tmp.symlink_to(target)"),
    ("atomic.py", 'with os.fdopen(fd, "wb" if binary else "w") as fh:'),
    ("dpdata_driver.py", 'labelled.to("deepmd/npy", "out")'),  # an example in the module's docstring
    ("report.py", 'fig.savefig(buf, format="png", dpi=110)'),  # into memory, then atomic_write
    ("labelling.py", "atomic_output(args.output, lambda tmp: labelled.to(args.output_fmt, tmp))"),
    ("kalman/state.py", "atomic_write(path, lambda fh: np.savez(fh, **arrays))"),
    ("kpu_engine.py", "return atomic_write(path, lambda fh: np.savez(fh, **arrays))"),
    ("dpgen/driver.py", 'with open(stripped, "w") as fh:'),  # a TemporaryDirectory of its own
    ("dpgen/driver.py", "json.dump(dpgen_jdata, fh, indent=4)"),
    ("deepmd_tf/trainer.py", "tmp.symlink_to(state.name)"),  # then os.replace onto the link
    ("deepmd_tf/trainer.py", 'fp = open(self.disp_file, "a") if self.run_opt.is_chief else None'),
    ("deepmd_tf/trainer.py", 'with open(trace, "a") as fh:'),  # ALKPU_RLEKF_TRACE, a line per update
}


def test_every_file_the_plugin_writes_goes_through_a_rename():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for line in path.read_text().splitlines():
            code = line.split("#")[0].strip()
            if WRITES.search(code) and not code.startswith(("'", '"')):
                found.add((path.relative_to(PACKAGE).as_posix(), line.split("  #")[0].strip()))
    assert found - ALLOWED == set(), "write these through alkpu_plugin/atomic.py"
    assert len(found & ALLOWED) >= 8  # the scan sees writes (and the allowed ones are still there)


# ------------------------------------------------------------------ kpu.npz and model_devi.out
def test_damaged_kpu_result_is_named_and_the_output_kept(tmp_path):
    path = small_result().save(tmp_path / "kpu.npz")
    assert len(KPUResult.load(path).frames) == 4
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=re.escape(f"the KPU result {path} is damaged") + ".*Compute it again"):
        KPUResult.load(path)
    with pytest.raises(InputError, match="does not exist"):
        KPUResult.load(tmp_path / "none.npz")
    # from the command line: one message, exit status 2, the existing output untouched
    (tmp_path / "model_devi.out").write_text("what the user had\n")
    proc = subprocess.run([ALKPU, "kpu", "--merge", str(path), "-o", "model_devi.out", "--overwrite"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"alkpu kpu: error: the KPU result {path} is damaged (BadZipFile")
    assert (tmp_path / "model_devi.out").read_text() == "what the user had\n"


def exploration(root, tasks=2):
    """iter.000000/01.model_devi with tasks as `alkpu lmp-kpu` leaves them."""
    out = []
    for t in range(tasks):
        task = root / "iter.000000" / "01.model_devi" / f"task.000.00000{t}"
        task.mkdir(parents=True)
        result = small_result(seed=t)
        result.save(task / "kpu.npz")
        write_result(task / "model_devi.out", result)
        out.append(task)
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[:-20], r"is damaged \(not a table of numbers"),  # cut inside a line
    (lambda text: "\n".join(text.splitlines()[:-1]) + "\n", r"is damaged \(truncated\?\): 3 frames, the "
                                                            r"exploration wrote 4"),  # cut at a line end
    (lambda text: text.replace("e-", "x-", 1), r"is damaged \(not a table of numbers"),
    (lambda text: "\n".join(" ".join(ln.split()[:5]) for ln in text.splitlines()) + "\n", r"is damaged: 5 columns, DP-GEN.s model_devi.out has 7"),
])
def test_damaged_model_devi_out_stops_before_selection(tmp_path, monkeypatch, damage, message):
    from alkpu_plugin.dpgen.driver import run_stage
    from alkpu_plugin.dpgen.stages import StageLog

    monkeypatch.chdir(tmp_path)
    tasks = exploration(tmp_path)
    assert read_model_devi(tasks[1] / "model_devi.out", 4).shape == (4, 7)
    path = tasks[1] / "model_devi.out"
    before = damage(path.read_text())
    path.write_text(before)
    with pytest.raises(ModelDeviError) as info:
        run_stage(0, "make_fp", {}, {}, {}, StageLog(tmp_path, stream=open(os.devnull, "w")))
    text = str(info.value)
    assert re.search(f"the exploration result iter.000000/01.model_devi/task.000.000001/model_devi.out {message}",
                     text), text
    assert "delete the lines after `0 3` in record.dpgen and run the same command" in text
    assert path.read_text() == before and not (tmp_path / "iter.000000" / "02.fp").exists()  # nothing made


def test_damaged_kpu_npz_of_a_task_stops_before_selection(tmp_path, monkeypatch):
    from alkpu_plugin.dpgen.driver import check_model_devi

    monkeypatch.chdir(tmp_path)
    tasks = exploration(tmp_path)
    check_model_devi(0)
    (tasks[0] / "kpu.npz").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(InputError, match=r"the KPU result iter.000000/01.model_devi/task.000.000000/kpu.npz is "
                                         r"damaged .*Explore iteration 0 again: delete the lines after `0 3`"):
        check_model_devi(0)


# ------------------------------------------------------------------ jobs across a killed driver
DRIVER = """
import sys
from dpdispatcher import Machine, Resources, Submission, Task
from alkpu_plugin.dpgen.jobs import guard_jobs
root = sys.argv[1]
machine = Machine.load_from_dict({"batch_type": "Shell", "context_type": "LocalContext",
                                  "local_root": root, "remote_root": root + "/remote"})
resources = Resources.load_from_dict({"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "group_size": 1})
task = Task(command=f"echo start >> {root}/starts; sleep 4; echo done > out", task_work_path="task",
            forward_files=[], backward_files=["out"], outlog="log", errlog="log")
submission = Submission(work_base="work", machine=machine, resources=resources, task_list=[task])
with guard_jobs():
    submission.run_submission(check_interval=0.5)
print("finished", flush=True)
"""


@pytest.mark.parametrize("whole_group", [False, True])
def test_a_job_is_never_run_twice_at_once_after_a_kill(tmp_path, whole_group):
    """The driver SIGKILLed while its Shell job runs, then started again: a job still running (the
    driver killed alone) is waited for, never submitted a second time; one killed with the driver
    (its process group) is submitted again, and that kill is not counted as one of its failures."""
    (tmp_path / "work" / "task").mkdir(parents=True)
    (tmp_path / "remote").mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)

    def driver():
        return subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    proc = driver()
    deadline = time.time() + 60
    while not (tmp_path / "starts").exists():  # the job runs
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    (os.killpg if whole_group else os.kill)(proc.pid, signal.SIGKILL)
    proc.wait()
    out, _ = driver().communicate(timeout=60)
    assert "finished" in out, out
    assert (tmp_path / "work" / "task" / "out").read_text() == "done\n"
    starts = (tmp_path / "starts").read_text().split()
    if whole_group:
        assert starts == ["start", "start"]  # killed with the driver, run again
    else:
        assert starts == ["start"]  # it ran on and was waited for
    assert "terminated; fail_cout" not in out  # never counted as a failure


# ------------------------------------------------------------------ command-line mistakes
def test_command_line_mistakes_are_named_before_any_work(tmp_path):
    (tmp_path / "machine.json").write_text('{"train": {')
    (tmp_path / "param.json").write_text("{}")
    cases = [
        (["run", "nothere.json", "machine.json"],
         f"alkpu run: error: param file 'nothere.json' does not exist (looked for it from {tmp_path}); give the "
         "path of your param file."),
        (["run", "param.json", "machine.json"],
         "alkpu run: error: machine file 'machine.json' cannot be read as JSON or YAML (JSONDecodeError: "
         "Expecting property name enclosed in double quotes: line 1 column 12 (char 11)); fix its syntax."),
        (["label", "-i", "nothere", "-o", "labelled"], "alkpu label: error: the input nothere does not exist"),
        (["kpu", "-s", "traj"], "alkpu kpu: error: --model and --system are needed (or --merge PARTS)"),
    ]
    for argv, message in cases:
        proc = subprocess.run([ALKPU, *argv], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1] == message, proc.stderr
        assert "Traceback" not in proc.stderr
        assert sorted(os.listdir(tmp_path)) == ["machine.json", "param.json"]  # nothing made
