"""A real single-node SLURM cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd,
and, where MariaDB and slurmdbd are installed, job accounting (its own mariadbd and slurmdbd) as
on the clusters users meet, so ``sacct`` answers.

Started by hand (there is no systemd) and stopped by the PIDs it started. Its
slurm.conf (and gres.conf) are installed at /etc/slurm for the run, because the job step
plugin clears SLURM_* variables (SLURM_CONF too) before calling srun inside a job, so srun
must find the configuration at the default place; files already there are put back at stop.
The profile polls job state with ``squeue``, so finished jobs must stay visible (MinJobAge >= 300);
the tests also list every job of a run after it ends, which can take longer than 5 minutes on
a busy machine: MinJobAge=3600.
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
ACCOUNTING = ("slurmdbd", "mariadbd", "mariadb-install-db", "sacct", "sacctmgr")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name,) if p.exists()), None)


def accounting_missing() -> list[str]:
    """The programs job accounting needs that are not installed (apt-get install slurmdbd mariadb-server)."""
    return [d for d in ACCOUNTING if _which(d) is None]


def why_unavailable() -> str | None:
    """Why a cluster cannot be started here, or None if it can."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [d for d in DAEMONS if _which(d) is None]
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
    return _which(name) or f"/usr/sbin/{name}"


@dataclass
class Cluster:
    root: Path
    cpus: int = 2
    mem_mb: int = 6000
    gpus: int = 1  # a GRES "gpu" the node advertises (no device file: it exercises --gpus requests, not CUDA)
    accounting: bool = False  # slurmdbd backed by a private mariadbd: sacct works, as on production clusters
    db_port: int = 0
    dbd_port: int = 0
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
{self._accounting_conf()}
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

    def _accounting_conf(self) -> str:
        if not self.accounting:
            return "AccountingStorageType=accounting_storage/none"
        self.db_port, self.dbd_port = _free_port(), _free_port()
        self._install(
            "slurmdbd.conf",
            f"""AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={self.root}/slurmdbd.pid
LogFile={self.root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=root
StorageLoc=roadxfer_test_acct
""",
        )
        (self.etc / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a config others can read
        # job_comment: sacct shows the comment the executor plugin sets (rule and wildcards), not only the UUID job name.
        return (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nAccountingStoragePort={self.dbd_port}\n"
                "AccountingStoreFlags=job_comment")

    def _start_accounting(self, log, timeout: float) -> None:
        """A throw-away MariaDB (root without password, TCP on 127.0.0.1 only) and slurmdbd on it."""
        data = self.root / "mariadb"
        subprocess.run([_exe("mariadb-install-db"), "--user=root", f"--datadir={data}", "--auth-root-authentication-method=normal", "--skip-test-db"],
                       stdout=log, stderr=log, check=True)
        self.procs.append(subprocess.Popen([_exe("mariadbd"), "--no-defaults", "--user=root", f"--datadir={data}", f"--socket={self.root}/mariadb.sock",
                                            f"--port={self.db_port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                                            "--innodb-buffer-pool-size=64M", f"--pid-file={self.root}/mariadb.pid", f"--log-error={self.root}/log/mariadb.log"],
                                           stdout=log, stderr=log))
        self._wait(lambda: self._port_open(self.db_port), timeout, "mariadbd did not start")
        self.procs.append(subprocess.Popen([_exe("slurmdbd"), "-D"], env=self.env, stdout=log, stderr=log))
        self._wait(lambda: self._port_open(self.dbd_port), timeout, "slurmdbd did not start")
        # The cluster must be known to slurmdbd before slurmctld registers with it.
        subprocess.run(["sacctmgr", "-i", "add", "cluster", "roadxfer-test"], env=self.env, stdout=log, stderr=log, check=True)

    def _check_alive(self) -> None:
        """Fail at once, naming it, when a daemon started for the cluster has exited."""
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {self.root}/log")

    def _port_open(self, port: int) -> bool:
        self._check_alive()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

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
        if self.accounting:
            self._start_accounting(log, timeout)
        self.procs.append(subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log))
        self.procs.append(subprocess.Popen([_exe("slurmd"), "-D", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log))
        self._wait(self._idle, timeout, "the node did not become idle")

    def _idle(self) -> bool:
        self._check_alive()
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

    def sacct(self, job_id: str) -> dict[str, str]:
        """The job as the accounting database records it (``sacct -X``): state (e.g. "CANCELLED by 0") and comment."""
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,Comment"], env=self.env, capture_output=True, text=True, check=True)
        state, _, comment = out.stdout.strip().partition("|")
        return {"state": state, "comment": comment}

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
