"""A real single-node SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd.

Started by hand (there is no systemd) and stopped by the PIDs it started. Its
slurm.conf (and gres.conf) are installed at /etc/slurm for the run, because the job step
plugin clears SLURM_* variables (SLURM_CONF too) before calling srun inside a job, so srun
must find the configuration at the default place; files already there are put back at stop. Job state is polled with ``squeue`` (no slurmdbd),
so finished jobs must stay visible (MinJobAge >= 300); the tests also list every job of a
run after it ends, which can take longer than 5 minutes on a busy machine: MinJobAge=3600.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def why_unavailable() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key: run mungekey (Debian's munge package creates it on install)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    root: Path
    cpus: int = 2
    mem_mb: int = 6000
    gpus: int = 1  # a GRES "gpu" the node advertises (no device file: it exercises --gpus requests, not CUDA)
    procs: list[subprocess.Popen] = field(default_factory=list)
    etc: Path = Path("/etc/slurm")
    _saved: dict[Path, bytes | None] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.etc / "slurm.conf"

    def _install(self, name: str, text: str) -> None:
        path = self.etc / name
        if path not in self._saved:
            self._saved[path] = path.read_bytes() if path.exists() else None
        path.write_text(text)

    def _restore(self) -> None:
        for path, old in self._saved.items():
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)
        self._saved.clear()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.etc.mkdir(parents=True, exist_ok=True)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        if self.gpus:
            self._install("gres.conf", "".join(f"NodeName={host} Name=gpu File=/dev/null\n" for _ in range(self.gpus)))
        self._install(
            "slurm.conf",
            f"""ClusterName=roadxfer-test
GresTypes=gpu
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
MinJobAge=3600
DefMemPerCPU=1000
KillWait=5
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb}{gres} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} MaxTime=INFINITE State=UP
""",
        )

    def _munge_ok(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def start(self, timeout: float = 60) -> None:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        self.write_conf()
        log = open(self.root / "log" / "daemons.out", "ab")
        if not self._munge_ok():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self.procs.append(subprocess.Popen(["runuser", "-u", "munge", "--", _exe("munged"), "--foreground"], stdout=log, stderr=log))
            self._wait(self._munge_ok, timeout, "munged did not start")
        self.procs.append(subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log))
        self.procs.append(subprocess.Popen([_exe("slurmd"), "-D", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log))
        self._wait(self._idle, timeout, "the node did not become idle")

    def _idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {self.root}/log")
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and "idle" in out.stdout

    def _wait(self, ok, timeout: float, message: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{message} within {timeout:.0f} s; logs in {self.root}/log")

    def jobs(self) -> list[dict[str, str]]:
        """Jobs slurmctld still knows (all of this run's, with MinJobAge=3600)."""
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%j|%P|%T|%C|%k"], env=self.env, capture_output=True, text=True, check=True)
        rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
        return [{"id": r[0], "name": r[1], "partition": r[2], "state": r[3], "cpus": r[4], "comment": r[5]} for r in rows]

    def job_details(self, job_id: str) -> str:
        return subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True, check=True).stdout

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self._restore()
