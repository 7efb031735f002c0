"""A one-node SLURM cluster, a PostgreSQL server and an MLflow server on this machine (as root): a development
and test tool, apart from the package (nothing in asr/ imports it).

For the tests and for trying the cluster path before using a real cluster:

    sudo .venv/bin/python -m asr.devcluster up       # starts everything, prints the environment to export
    eval "$(.venv/bin/python -m asr.devcluster env)"  # SLURM_CONF, MLFLOW_TRACKING_URI, OPTUNA_STORAGE
    python sweep.py hydra/launcher=slurm sweep.storage=$OPTUNA_STORAGE ...
    sudo .venv/bin/python -m asr.devcluster down     # stops everything it started (by PID)

Everything lives under one folder (--dir, default /tmp/asr-cluster) and listens on 127.0.0.1 only,
on free ports picked at start: munged, slurmctld + slurmd (one node, 2 fake GPUs as GRES, so
`--gpus-per-node=1` jobs get CUDA_VISIBLE_DEVICES=0 or 1), PostgreSQL (databases `mlflow` and
`optuna`) and `mlflow server` on PostgreSQL. There is no SLURM accounting: the drivers notice a job
that left the queue without a result themselves (asr.cluster.jobs).
Needs Debian's `slurmctld slurmd slurm-client munge postgresql` (see PACKAGES) and root.
One concern over ~300 lines: bringing up, describing and tearing down the same four servers, whose
config files and start order depend on each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACKAGES = "slurmctld slurmd slurm-client munge postgresql"  # apt-get install -y --no-install-recommends ...
DEFAULT_DIR = Path("/tmp/asr-cluster")
STATE_FILE = "cluster.json"  # PIDs, ports and environment of a running cluster
GPUS = 2  # fake GPUs declared on the node (character devices, no CUDA behind them)
DB_USER = DB_PASSWORD = "asr"  # PostgreSQL role of the MLflow server and the studies (trust auth on 127.0.0.1)


def postgres_bin() -> Path | None:
    """Debian keeps initdb/postgres/pg_ctl out of PATH, in /usr/lib/postgresql/<version>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


def missing() -> str | None:
    """None when this machine can run the local cluster, else one line saying what to install or why not."""
    absent = [
        name for name in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue") if not shutil.which(name)
    ]
    if postgres_bin() is None:
        absent.append("initdb")
    if absent:
        return (
            f"local SLURM cluster: {', '.join(absent)} not found; as root: apt-get install -y "
            f"--no-install-recommends {PACKAGES}"
        )
    if os.geteuid() != 0:
        return "local SLURM cluster: needs root (slurmd and munged run as root/munge)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, ready, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log and log.is_file() else ""
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s{tail}")


def quiet(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


class LocalCluster:
    """Start and stop the four servers; `state` (saved as cluster.json) records what runs."""

    def __init__(self, base: Path = DEFAULT_DIR) -> None:
        self.base = Path(base).resolve()
        self.state_file = self.base / STATE_FILE
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.pids: dict[str, int] = self.state.get("pids", {})

    # ---- what users export -------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return dict(self.state.get("env", {}))

    def exports(self) -> str:
        return "\n".join(f"export {k}={v}" for k, v in self.env.items())

    def running(self) -> bool:
        return bool(self.pids) and all(_alive(pid) for pid in self.pids.values())

    # ---- up ----------------------------------------------------------------------------------
    def up(self, mlflow: bool = True) -> dict[str, str]:
        if self.running():
            return self.env
        if self.pids:
            self.down()
        if reason := missing():
            raise RuntimeError(reason)
        if self.base.exists():
            shutil.rmtree(self.base)
        self.base.mkdir(parents=True)
        self.base.chmod(0o755)  # munge and postgres must traverse it (mkdtemp folders are 0700)
        ports = {"slurmctld": free_port(), "slurmd": free_port(), "postgres": free_port(), "mlflow": free_port()}
        self.state = {"base": str(self.base), "ports": ports, "pids": {}, "env": {}}
        self.pids = self.state["pids"]
        try:
            socket_path = self._start_munge()
            self._start_slurm(ports, socket_path)
            storage = self._start_postgres(ports["postgres"])
            self.state["env"]["OPTUNA_STORAGE"] = storage
            if mlflow:
                self.state["env"]["MLFLOW_TRACKING_URI"] = self._start_mlflow(ports)
        except BaseException:
            self.down()
            raise
        self._save()
        return self.env

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def _spawn(self, name: str, cmd: list[str], user: str | None = None, env: dict | None = None) -> subprocess.Popen:
        log = open(self.base / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=user,
            start_new_session=True,
            env=env,
            cwd=self.base,
        )
        log.close()
        self.pids[name] = proc.pid
        self._save()
        return proc

    def _start_munge(self) -> str:
        (self.base / "logs").mkdir()
        (self.base / "logs").chmod(0o777)  # munged and postgres write their own logs here
        munge = self.base / "munge"
        munge.mkdir()
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        shutil.chown(munge, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        socket_path = str(munge / "munge.socket")
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--log-file={munge / 'munged.log'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            user="munge",
        )
        wait_for(
            "munged",
            lambda: quiet(f"munge -S {socket_path} -n | unmunge -S {socket_path}", shell=True).returncode == 0,
            10,
            munge / "munged.log",
        )
        return socket_path

    def _start_slurm(self, ports: dict, socket_path: str) -> None:
        slurm = self.base / "slurm"
        for sub in ("state", "spool"):
            (slurm / sub).mkdir(parents=True)
        dev = self.base / "dev"
        dev.mkdir()
        for index in range(GPUS):  # /dev/null's numbers: SLURM only needs a device file per GPU
            os.mknod(dev / f"nvidia{index}", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        host = socket.gethostname().split(".")[0]  # NodeName and SlurmctldHost must equal `hostname -s`
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        conf = slurm / "slurm.conf"
        conf.write_text(
            SLURM_CONF.format(
                host=host,
                base=self.base,
                slurm=slurm,
                munge_socket=socket_path,
                ctld_port=ports["slurmctld"],
                slurmd_port=ports["slurmd"],
                cpus=os.cpu_count() or 1,
                memory_mb=max(1024, memory_mb - 2048),
                gpus=GPUS,
            )
        )
        (slurm / "gres.conf").write_text(f"NodeName={host} Name=gpu File={dev}/nvidia[0-{GPUS - 1}]\n")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        self.state["env"]["SLURM_CONF"] = str(conf)
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(conf)], env=env)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(conf)], env=env)
        wait_for(
            "the SLURM node",
            lambda: quiet(["sinfo", "-h", "-N", "-o", "%T"], env=env).stdout.strip() == "idle",
            30,
            self.base / "logs" / "slurmctld.log",
        )

    def _start_postgres(self, port: int) -> str:
        bin_dir = postgres_bin()
        pg = self.base / "pg"
        pg.mkdir()
        shutil.chown(pg, "postgres", "postgres")
        pg.chmod(0o700)
        data = pg / "data"
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale"],
            check=True,
            capture_output=True,
            user="postgres",
            cwd=pg,
        )
        self._spawn(
            "postgres",
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(pg),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            user="postgres",
        )
        ready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
        wait_for("PostgreSQL", lambda: quiet(ready).returncode == 0, 30, self.base / "logs" / "postgres.log")
        psql = [str(bin_dir / "psql"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c"]
        subprocess.run(
            [*psql, f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PASSWORD}'"], check=True, capture_output=True
        )
        for db in ("mlflow", "optuna"):
            subprocess.run([*psql, f"CREATE DATABASE {db} OWNER {DB_USER}"], check=True, capture_output=True)
        self.state["postgres_url"] = f"postgresql+psycopg2://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{port}"
        return f"{self.state['postgres_url']}/optuna"

    def _start_mlflow(self, ports: dict) -> str:
        url = f"http://127.0.0.1:{ports['mlflow']}"
        self._spawn(
            "mlflow",
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"{self.state['postgres_url']}/mlflow",
                "--artifacts-destination",
                str(self.base / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "2",
            ],
        )
        wait_for("the MLflow server", lambda: _http_ok(f"{url}/health"), 120, self.base / "logs" / "mlflow.log")
        return url

    # ---- down --------------------------------------------------------------------------------
    def down(self) -> None:
        """Cancel every job of this cluster, then stop the servers this folder's cluster.json lists."""
        conf = self.state.get("env", {}).get("SLURM_CONF")
        if conf and self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            env = {**os.environ, "SLURM_CONF": conf}
            quiet(["scancel", "--full", f"--user={os.getuid()}"], env=env, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and quiet(["squeue", "-h"], env=env, timeout=20).stdout.strip():
                time.sleep(0.3)
        for name, pid in self.pids.items():  # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for its clients)
            _signal(
                pid, signal.SIGINT if name == "postgres" else signal.SIGTERM, group=name == "mlflow"
            )  # MLflow: its workers too
        deadline = time.monotonic() + 5  # then SIGKILL: the MLflow server waits for its clients' keep-alive connections
        for name, pid in self.pids.items():
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                _signal(pid, signal.SIGKILL, group=name == "mlflow")
        self.pids.clear()
        if self.state_file.parent.is_dir():
            self.state["pids"] = self.pids
            self._save()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if this process started it
    except ChildProcessError:
        pass


SLURM_CONF = """\
# One-node cluster written by `python -m asr.devcluster up`; everything under {base}
ClusterName=asr-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={slurm}/state
SlurmdSpoolDir={slurm}/spool
SlurmctldPidFile={slurm}/slurmctld.pid
SlurmdPidFile={slurm}/slurmd.pid
SlurmctldLogFile={base}/logs/slurmctld.log
SlurmdLogFile={base}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# a cancelled job gets SIGKILL 2 s after SIGTERM (default 30 s; submitit's jobs ignore SIGTERM)
KillWait=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asr.devcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "action",
        choices=["up", "down", "env", "status"],
        help="up: start and print the env; down: stop; env: print the env",
    )
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"folder holding all state and logs (default {DEFAULT_DIR})"
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="skip the MLflow server (saves ~20 s and ~1 GB of memory)"
    )
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    try:
        if args.action == "up":
            cluster.up(mlflow=not args.no_mlflow)
            print(cluster.exports())
            print(
                f"# logs in {cluster.base / 'logs'}; stop with: python -m asr.devcluster down --dir {cluster.base}",
                file=sys.stderr,
            )
        elif args.action == "down":
            cluster.down()
        elif args.action == "env":
            if not cluster.running():
                raise RuntimeError(
                    f"no local cluster runs from {cluster.base}: start one with `python -m asr.devcluster up`"
                )
            print(cluster.exports())
        else:
            print("running" if cluster.running() else "stopped")
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
