"""launch/slurm.sbatch on a real one-node Slurm cluster started here, with two CPU ranks.

The `slurm_cluster` fixture starts munged, slurmctld and slurmd in the foreground
from a temp dir (their own key, socket, ports, state and logs), so it touches no
system configuration, and stops them afterwards. It skips when Slurm is not
installed (`scripts/ci_slurm.sh` installs it) or without root, which slurmd needs.

The tests submit the script as a user would and check: a plain run; a preemption
(`scancel --signal=USR1 --batch`, what `#SBATCH --signal=B:USR1@600` sends before the
time limit) that reaches both ranks, which checkpoint and stop, after which the job
requeues itself and resumes to the losses and weights of an uninterrupted run; and
`MAX_REQUEUES`, past which the job ends with status 75 instead.
"""

from __future__ import annotations

import contextlib
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
import torch

from cluster.manifest import TRAINER_STATE_FILE
from tests.helpers import (
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    SlurmJob,
    assert_same_weights,
    check_saved_run,
    free_port,
    run_script,
    runs_of,
    step_losses,
    tail,
)

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
# cred_expire also delays a requeued job's restart (by cred_expire + 1 s; 121 s by default), and the
# scheduler would otherwise look at pending jobs once every 30-60 s: a requeue restarts in ~12 s here.
AuthInfo=socket={munge_socket},cred_expire=10
SchedulerParameters=sched_interval=1,bf_interval=1
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


# Far beyond the script's 600 s signal lead (--signal=B:USR1@600): with --time=10, Slurm would send the
# preemption warning as soon as the job starts.
TIME_LIMIT_MIN = 60
JOB_TIMEOUT_S = 240  # per run of a job: mostly start-up (35 s on 2 loaded cores), then 10-30 s of training
PREEMPTED_EXIT_CODE = 75  # cluster/resilience.py's, which slurm.sbatch passes on when it does not requeue
# Two ranks of one thread each, in Slurm and out of it: the same arithmetic in the same order.
RANKS_ENV = {"NUM_GPUS": "2", "CPU_THREADS_PER_RANK": "1"}


@contextlib.contextmanager
def submitted(
    cluster: SlurmCluster,
    tmp_path: Path,
    overrides: tuple[str, ...],
    env: dict[str, str] | None = None,
    runs: int = 1,
) -> Iterator[SlurmJob]:
    """launch/slurm.sbatch submitted with 2 CPU ranks on the one node; cancelled on the way out if still there.

    The job gets `runs` times `JOB_TIMEOUT_S` (a requeued job runs more than once). Polls the job instead
    of `sbatch --wait`, which checks at growing intervals (up to 30 s apart).
    """
    submit_dir, output_dir = tmp_path / "submit", tmp_path / "run"
    (submit_dir / "logs").mkdir(parents=True)  # where the script's #SBATCH --output puts the job log
    job_env = {
        **cluster.client_env(),
        "REPO_DIR": str(REPO_ROOT),
        "OUTPUT_DIR": str(output_dir),
        "PYTHON": sys.executable,
        **RANKS_ENV,
        **(env or {}),
    }
    job_name = "launch-test"
    command = [
        "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--partition={cluster.partition}",
        f"--time={TIME_LIMIT_MIN}", f"--job-name={job_name}", str(LAUNCH_DIR / "slurm.sbatch"), *overrides,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=submit_dir, env=job_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"sbatch failed:\n{result.stdout}{result.stderr}\n{_daemon_logs(cluster.root)}"
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "<id>[;<cluster>]"
    job = SlurmJob(
        id=job_id,
        log=submit_dir / "logs" / f"{job_name}-{job_id}.out",
        output_dir=output_dir,
        env=job_env,
        deadline=time.monotonic() + runs * JOB_TIMEOUT_S,
        client=_client,
        log_dirs=[cluster.root],
    )
    try:
        yield job
    finally:
        job.cancel()


def _client(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """A Slurm client command on this machine (the one-node cluster's node)."""
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def test_sbatch_runs_two_cpu_ranks_and_logs_per_job(slurm_cluster: SlurmCluster, tmp_path: Path, base_model_dir: Path):
    overrides = ("deepspeed=none", "debug=quick", "training.eval_strategy=no", NO_HELDOUT)
    with submitted(slurm_cluster, tmp_path, overrides) as job:
        info, states = job.wait_until_done()
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} {info['ExitCode']} after {states}\n{job.describe()}"
    assert job.log.is_file(), f"no job log {job.log}"
    log = job.log.read_text()
    assert f"job {job.id} (restart 0)" in log and f"output {job.output_dir}" in log, log
    assert "Saved the final model" in log, tail(log)
    # The script always passes training.resume_from_checkpoint=auto: a first start finds no checkpoint.
    assert "no complete checkpoint" in log and "starting fresh" in log, tail(log)
    check_saved_run(job.output_dir, base_model_dir, ranks=2)


# Long enough that a signal sent after a few logged steps lands mid-run (a step takes 0.1-0.4 s here, the
# signal reaches the ranks within 0.1 s), crossing an epoch (53 steps) after the resume. A dataloader
# worker per rank, as on GPUs (conf/training/default.yaml): srun passes a signal to every process of the
# step, workers included, and one that died of it would fail its rank instead of letting it checkpoint.
PREEMPT_STEPS = 60
PREEMPT_RUN = (
    "deepspeed=none",
    "debug=quick",
    f"training.max_steps={PREEMPT_STEPS}",
    "training.save_strategy=steps",
    "training.save_steps=20",
    "training.logging_steps=1",
    "training.eval_strategy=no",
    "training.dataloader_num_workers=1",
    NO_HELDOUT,
)
SIGNAL_AFTER_STEP = 3


def preempt(job: SlurmJob) -> int:
    """Sends the batch shell Slurm's time-limit warning (#SBATCH --signal=B:USR1) once training is under way.

    Returns the last step logged before the signal.
    """
    job.wait_for_step(SIGNAL_AFTER_STEP)
    logged = max(job.logged_steps())
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=job.env, timeout=10, check=True)
    return logged


def preempted_step(run_log: str) -> int:
    """The step both ranks stopped at, checked against the marker rank 0 left for slurm.sbatch."""
    # Rank 0 logs to the console at INFO, rank 1 its warnings with a "[rank 1] " prefix.
    stops = re.findall(
        r"^(\[rank 1\] )?\S+ \S+ WARNING cluster.resilience: Preempted: stopped at step (\d+)", run_log, re.MULTILINE
    )
    assert sorted(rank for rank, _ in stops) == ["", "[rank 1] "], (
        f"not both ranks stopped for the signal:\n{tail(run_log)}"
    )
    # srun signals every process of the step, so the ranks stop even if torchrun dies of the signal; but
    # a dead torchrun ends the step, and Slurm kills what is left of it (proctrack/cgroup), saving or not.
    # torchrun must catch it and wait for its ranks (PET_SIGNALS_TO_HANDLE in launch/multi_node.sh).
    assert re.search(r"Received (\S*SIGUSR1|10) death signal, shutting down workers", run_log), (
        f"torchrun did not catch the SIGUSR1:\n{tail(run_log)}"
    )
    steps = {int(step) for _, step in stops}
    assert len(steps) == 1, f"the ranks stopped at different steps {steps}"
    step = steps.pop()
    assert re.search(
        rf'slurm.sbatch: preempted \(\{{"step": {step}, "checkpoint": "[^"]*checkpoint-{step}"', run_log
    ), f"slurm.sbatch did not report the ranks' marker for step {step}:\n{tail(run_log)}"
    return step


def test_preempted_job_requeues_itself_and_resumes_to_the_uninterrupted_loss(
    slurm_cluster: SlurmCluster, tmp_path: Path, base_model_dir: Path
):
    reference_dir = tmp_path / "reference"
    run_script(
        [str(LAUNCH_DIR / "multi_node.sh"), *PREEMPT_RUN, f"output_dir={reference_dir}"],
        env={**os.environ, "PYTHON": sys.executable, **RANKS_ENV, "NNODES": "1", "MASTER_PORT": str(free_port())},
        timeout=JOB_TIMEOUT_S,
        log_dirs=[reference_dir / "logs"],
    )
    with submitted(slurm_cluster, tmp_path, PREEMPT_RUN, runs=2) as job:
        signalled_after = preempt(job)
        info, states = job.wait_until_done()
    log = job.log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (
        f"{info['JobState']} {info['ExitCode']}, requeued {info['Restarts']} times, after {states}\n{job.describe()}"
    )
    first, second = runs_of(log, job.id)
    assert "slurm.sbatch: got SIGUSR1" in first and "starting fresh" in first, tail(first)
    stopped_at = preempted_step(first)
    # Step N logged means its stop check is past: a stop the signal caused comes at N + 1 or later.
    assert signalled_after < stopped_at < PREEMPT_STEPS, f"signalled after step {signalled_after}"
    assert "requeue 1 of 10" in first, tail(first)  # MAX_REQUEUES defaults to 10
    assert f"resuming from {job.output_dir / f'checkpoint-{stopped_at}'}" in second, tail(second)
    assert "Preempted" not in second and "Saved the final model" in second, tail(second)
    check_saved_run(job.output_dir, base_model_dir, ranks=2)

    # Resuming restores the weights, Adam's moments, the LR schedule, the RNG and the data position
    # exactly, and both runs do the same fp32 arithmetic in the same order: they agree bit for bit here.
    # 1e-6 leaves room for a harmless reordering only; a resume that repeats or skips a batch, or resets
    # the optimizer or the schedule, moves a step's loss by 1e-3 or more.
    losses, reference = step_losses(job.output_dir), step_losses(reference_dir)
    assert [step for step, _ in losses] == list(range(1, PREEMPT_STEPS + 1)), f"steps logged: {losses}"
    assert [step for step, _ in reference] == list(range(1, PREEMPT_STEPS + 1)), reference
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in losses], dtype=torch.float64),
        torch.tensor([loss for _, loss in reference], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
        msg=lambda m: f"per-step losses differ from the uninterrupted run (resumed at {stopped_at}):\n{m}",
    )
    assert_same_weights(job.output_dir, reference_dir, atol=1e-6)


def test_preempted_job_past_max_requeues_exits_75_with_its_checkpoint(slurm_cluster: SlurmCluster, tmp_path: Path):
    with submitted(slurm_cluster, tmp_path, PREEMPT_RUN, env={"MAX_REQUEUES": "0"}) as job:
        preempt(job)
        info, states = job.wait_until_done()
    log = job.log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (
        f"{info['JobState']} after {states}\n{job.describe()}"
    )
    assert info["ExitCode"] == f"{PREEMPTED_EXIT_CODE}:0", f"exit code {info['ExitCode']}\n{job.describe()}"
    (run,) = runs_of(log, job.id)
    stopped_at = preempted_step(run)
    assert "already requeued 0 times (MAX_REQUEUES=0): not again" in run, tail(run)
    assert (job.output_dir / f"checkpoint-{stopped_at}" / TRAINER_STATE_FILE).is_file()
    assert not (job.output_dir / "model.safetensors").exists(), "a preempted run saved a final model"
