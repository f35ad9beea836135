"""launch/slurm.sbatch on a real one-node Slurm cluster started here, with two CPU ranks.

The `slurm_cluster` fixture starts munged, slurmctld and slurmd in the foreground
from a temp dir (their own key, socket, ports, state and logs), so it touches no
system configuration, and stops them afterwards. It skips when Slurm is not
installed (`scripts/ci_slurm.sh` installs it) or without root, which slurmd needs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch.conftest import LAUNCH_DIR, REPO_ROOT, check_saved_run, free_port, run_script, tail

pytestmark = pytest.mark.distributed

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel")
PARTITION = "launchtest"
NODE_CPUS = 2
START_TIMEOUT_S = 60


@dataclass
class SlurmCluster:
    root: Path
    """Configuration, state and the daemons' logs."""
    conf: Path
    node: str
    partition: str

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _slurm_conf(root: Path, node: str, munge_socket: Path) -> str:
    return f"""\
ClusterName=launchtest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _daemon_logs(root: Path) -> str:
    parts = []
    for name in ("munged.log", "slurmctld.log", "slurmd.log"):
        path = root / name
        if path.exists():
            parts += [f"--- {path} ---", tail(path.read_text(errors="replace"), 15)]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)} on PATH): run scripts/ci_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root (SlurmdUser=root launches the job's processes)")

    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o700)  # munged refuses a key file in a directory others can write to
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    munge_socket = root / "munge.sock"
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, munge_socket))
    cluster = SlurmCluster(root=root, conf=conf, node=node, partition=PARTITION)

    # --force: munged otherwise refuses a socket in a directory that not everyone can enter (this 0700 one).
    commands = [
        [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed",
        ],
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]  # fmt: skip
    daemons: list[subprocess.Popen] = []
    try:
        for command in commands:
            with open(root / f"{command[0]}.out", "wb") as out:
                daemons.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
            if command[0] == "munged":
                _wait_for(munge_socket.exists, "munged to create its socket", root)
        _wait_for(lambda: _node_state(cluster) == "idle", f"node {node} to be idle", root)
        yield cluster
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _node_state(cluster: SlurmCluster) -> str:
    result = subprocess.run(
        ["sinfo", "--noheader", "--nodes", cluster.node, "--format=%T"],
        env=cluster.client_env(),
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout.strip()


def _wait_for(ready, what: str, root: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {START_TIMEOUT_S} s waiting for {what}\n{_daemon_logs(root)}")
        time.sleep(0.5)


def test_sbatch_runs_two_cpu_ranks_and_logs_per_job(slurm_cluster: SlurmCluster, tmp_path: Path, base_model_dir: Path):
    submit_dir = tmp_path / "submit"
    (submit_dir / "logs").mkdir(parents=True)  # where the script's #SBATCH --output puts the job log
    output_dir = tmp_path / "run"
    env = {
        **slurm_cluster.client_env(),
        "REPO_DIR": str(REPO_ROOT),
        "OUTPUT_DIR": str(output_dir),
        "NUM_GPUS": "2",
        "PYTHON": sys.executable,
    }
    job_name = "launch-test"
    command = [
        "sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", f"--partition={slurm_cluster.partition}",
        "--time=10", f"--job-name={job_name}", str(LAUNCH_DIR / "slurm.sbatch"),
        "deepspeed=none", "debug=quick", "training.eval_strategy=no", "heldout.file=null",
    ]  # fmt: skip
    try:
        output = run_script(
            command,
            env=env,
            timeout=240,
            log_dirs=[submit_dir / "logs", output_dir / "logs", slurm_cluster.root],
            cwd=submit_dir,
        )
    finally:
        # A job still queued or running after a failed or timed-out wait would hold the node for the next test.
        subprocess.run(["scancel", f"--name={job_name}"], env=env, timeout=10, check=False)
    submitted = re.search(r"Submitted batch job (\d+)", output)
    assert submitted, f"sbatch printed no job id:\n{output}"
    job_id = submitted.group(1)

    job_log = submit_dir / "logs" / f"{job_name}-{job_id}.out"
    assert job_log.is_file(), f"no job log {job_log}; sbatch said:\n{output}"
    log = job_log.read_text()
    assert f"job {job_id} (restart 0)" in log and f"output {output_dir}" in log, log
    assert "Saved the final model" in log, tail(log)
    # The script always passes training.resume_from_checkpoint=auto: a first start finds no checkpoint.
    assert "no complete checkpoint" in log and "starting fresh" in log, tail(log)
    check_saved_run(output_dir, base_model_dir, ranks=2)
