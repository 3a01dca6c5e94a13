"""A real one-host Slurm cluster for the tests: munged, slurmctld and slurmd started directly.

Everything lives in one directory: a slurm.conf written for this host (``hostname -s``, the CPUs
and memory ``slurmd -C`` reports), its own munge key and socket, free TCP ports, state, spool and
log files. No cgroups, no accounting database, no systemd. Slurm records every finished job in
``jobcomp.txt`` (``jobcomp/filetxt``), and its epilog writes the files of each job's working
directory, with their sizes and SHA-256, to
``epilog/<job id>.txt`` before the job leaves the node: what went up with the job and what it made,
seen from Slurm's side (dpdispatcher deletes its remote directory once a submission has finished).

``SlurmCluster.start(root)`` returns a running cluster or raises ``SlurmUnavailable`` with the
reason (not root, a program missing, a daemon that did not start, with its log's tail).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel")

EPILOG = r"""#!/bin/sh
# one file per job: the job's working directory as the job left it (type, size, path)
# and the SHA-256 of its files (links followed)
out="{logdir}/$SLURM_JOB_ID.txt"
dir=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *WorkDir=//p')
{{
  echo "WorkDir=$dir"
  if [ -n "$dir" ] && [ -d "$dir" ]; then
    cd "$dir" && find . -mindepth 1 -printf 'file %y %s %p\n' | sort -k4
    find . -name traj -prune -o \( -type f -o -type l \) -exec sha256sum {{}} + 2>/dev/null \
      | sed 's/^/sha256 /'
  fi
}} > "$out.tmp" 2>&1
mv "$out.tmp" "$out"
exit 0
"""


class SlurmUnavailable(RuntimeError):
    """This host cannot run the test cluster; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} was not written)"
    return "\n".join(text[-lines:]) or f"({path} is empty)"


def missing_reason() -> str | None:
    """Why this host cannot run the cluster before trying (None: it can try)."""
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root (slurmd runs jobs as their user; SlurmUser=root)"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f"Slurm programs not installed: {', '.join(missing)} "
                "(Debian: apt-get install slurmctld slurmd slurm-client munge, or `make slurm` as root)")
    return None


def node_line(hostname: str) -> str:
    """This host's node definition from ``slurmd -C`` (CPUs, sockets, cores, threads, memory)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
    first = out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""
    if not first.startswith("NodeName="):
        raise SlurmUnavailable(f"`slurmd -C` did not describe this node (exit {out.returncode}): "
                               f"{out.stdout[-500:]}{out.stderr[-1500:]}")
    fields = [f for f in first.split() if not f.startswith(("NodeName=", "UpTime="))]
    return " ".join([f"NodeName={hostname}", f"NodeHostname={hostname}", "NodeAddr=127.0.0.1", *fields,
                     "State=UNKNOWN"])


class SlurmCluster:
    """munged + slurmctld + slurmd for this host, configured in ``root``."""

    partition = "debug"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.hostname = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip() \
            or socket.gethostname().split(".")[0]
        self.jobcomp = self.root / "jobcomp.txt"
        self.epilog_dir = self.root / "epilog"
        self.procs: dict[str, subprocess.Popen] = {}
        self.munge_dir = self.root / "munge"
        if len(str(self.munge_dir / "munge.socket.lock")) > 100:  # a Unix socket's path is short
            self.munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.socket = self.munge_dir / "munge.socket"
        self.logs = {name: self.root / "log" / f"{name}.log" for name in ("munged", "slurmctld", "slurmd")}

    # ------------------------------------------------------------ set-up
    @property
    def env(self) -> dict:
        """What a client (sbatch, squeue, dpdispatcher) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_files(self):
        for sub in ("log", "state", "spool", "munge", "epilog"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(exist_ok=True)
        os.chmod(self.munge_dir, 0o700)
        key = self.munge_dir / "munge.key"
        if not key.exists():  # this cluster's own key, readable by its owner only
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        epilog = self.root / "epilog.sh"
        epilog.write_text(EPILOG.format(logdir=self.epilog_dir))
        epilog.chmod(0o755)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=alkputest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs['slurmctld']}",
            f"SlurmdLogFile={self.logs['slurmd']}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups: processes tracked through /proc, no task binding, no accounting
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            f"Epilog={epilog}",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            node_line(self.hostname),
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start(self, name, argv):
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env}, start_new_session=True)
        log.close()

    def _fail(self, what: str, name: str):
        proc = self.procs.get(name)
        code = proc.poll() if proc else None
        status = f"exited with {code}" if code is not None else "is running"
        tail = _tail(self.logs[name]) + "\n" + _tail(self.root / "log" / f"{name}.stdout", 10)
        self.stop()
        raise SlurmUnavailable(f"{what} ({name} {status}); tail of its log:\n{tail}")

    def _wait(self, what, name, ok, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.3)
        self._fail(what, name)

    def run(self, *argv, timeout=30, check=False) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **self.env})
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def node_state(self) -> str:
        try:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    @classmethod
    def start(cls, root: Path, timeout: float = 60) -> "SlurmCluster":
        reason = missing_reason()
        if reason:
            raise SlurmUnavailable(reason)
        self = cls(root)
        self._write_files()
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.socket}",
                               f"--key-file={self.munge_dir / 'munge.key'}",
                               f"--pid-file={self.munge_dir / 'munged.pid'}",
                               f"--seed-file={self.munge_dir / 'munged.seed'}",
                               f"--log-file={self.logs['munged']}"])
        self._wait("munged did not open its socket", "munged", self.socket.exists, timeout)
        self._start("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait("slurmctld did not answer `sinfo`", "slurmctld", lambda: self.node_state() != "", timeout)
        self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.hostname])
        self._wait(f"node {self.hostname} did not become idle in `sinfo`", "slurmd",
                   lambda: self.node_state() == "idle", timeout)
        return self

    # ------------------------------------------------------------ use
    def job_records(self) -> list[dict]:
        """Slurm's own record of every finished job (jobcomp/filetxt): JobId, JobName, JobState,
        WorkDir, ExitCode, ..."""
        if not self.jobcomp.exists():
            return []
        records = []
        for line in self.jobcomp.read_text().splitlines():
            rec, key = {}, None
            for word in line.split(" "):
                if "=" in word and word.split("=", 1)[0].isalnum():
                    key, value = word.split("=", 1)
                    rec[key] = value
                elif key is not None:  # a value with spaces
                    rec[key] += " " + word
            if rec:
                records.append(rec)
        return records

    def epilog(self, job_id) -> dict:
        """What the epilog saw of job ``job_id``: its WorkDir, {path: (type, size)}, {path: sha256}."""
        files, sums, workdir = {}, {}, None
        for line in (self.epilog_dir / f"{job_id}.txt").read_text().splitlines():
            if line.startswith("WorkDir="):
                workdir = line.split("=", 1)[1]
            elif line.startswith("file "):
                _, kind, size, path = line.split(" ", 3)
                files[path[2:]] = (kind, int(size))
            elif line.startswith("sha256 "):
                _, digest, path = line.split(maxsplit=2)
                sums[path[2:]] = digest
        return {"WorkDir": workdir, "files": files, "sha256": sums}

    def stop(self):
        """Cancel what is left, then stop slurmd, slurmctld and munged."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--partition", self.partition, timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
