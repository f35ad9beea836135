"""launch/slurm.sbatch with --nodes=2 on a Slurm cluster of namespace nodes: one rank per node, trained as 2 ranks on
one node, and requeued when a node is lost.

The nodes are network (and UTS) namespaces (`netns_nodes`, as in tests/launch/test_two_nodes.py); on them
scripts/slurm_two_nodes.sh starts munged and slurmctld on node0 and a slurmd on each node, with its own NodeName,
address and hostname, all from a temp dir (config, key, state, logs): the machine's own configuration and network
are not touched. The clients (sbatch, scontrol) run on node0, as on a login node; the machine itself has no route to
the nodes. The job gets what a cluster gives: SLURM_JOB_NODELIST=node[0-1], from which slurm.sbatch takes
MASTER_ADDR (node0, resolved by the nodes' /etc/hosts), and srun starts launch/multi_node.sh on each node with its
SLURM_NODEID as NODE_RANK; torchrun's ranks then meet over the nodes' network.

The bound is 0, for the reason tests/launch/test_two_nodes.py gives: with 2 ranks each reduced element is one float32
addition of two values, commutative in IEEE arithmetic, and the rest (data order, micro-batches, each rank's thread
count) is the same as in the one-node reference (`zero3_deepspeed_run`, 2 ranks on one node), so only the transport
differs and it cannot change a bit.

A lost node, on a cluster of 3 such nodes: node1's network taken down and its processes killed (a machine that died);
Slurm marks it DOWN after SlurmdTimeout (20 s here) and requeues the job, which starts on node0 and the spare node2.
And node1's ranks killed with its slurmd alive: node0's rank leaves lost_node.json and launch/slurm.sbatch requeues
the job, which starts on both nodes again. And a preemption (SIGUSR1 to the batch shell): both nodes' ranks stop at
one step with a checkpoint and slurm.sbatch requeues the job. Each requeued job resumes from its checkpoint and must
end with the losses and weights of the uninterrupted run, bound 0.

The cluster is stopped, and the nodes destroyed with every process left in them, however the module ends; the
test fails if a daemon, a namespace or a shared-memory buffer is left. Skips without root, ip/unshare (netns) or
Slurm and munge (scripts/ci_slurm.sh installs them).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    LaunchedRun,
    NetnsNode,
    SlurmJob,
    assert_prepared_once,
    assert_same_training,
    check_saved_run,
    cores_per_node,
    netns_missing,
    netns_nodes,
    runs_of,
    tail,
)

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(bool(netns_missing()), reason=netns_missing())]

SLURM_SCRIPT = REPO_ROOT / "scripts" / "slurm_two_nodes.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "srun")
NODES = 2
PARTITION = "nodes"  # scripts/slurm_two_nodes.sh's default
START_TIMEOUT_S = 60
TIME_LIMIT_MIN = 60  # far beyond slurm.sbatch's 600 s preemption warning (#SBATCH --signal=B:USR1@600)
RUN = ("deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT)
# Each node's rank gets this machine's cores split between the nodes, as launch/env.sh splits them between the 2
# ranks of the one-node reference.
THREADS = str(cores_per_node(NODES))


@dataclass
class SlurmCluster:
    """A Slurm cluster of namespace nodes (`slurm_cluster_on`): its state directory and its nodes."""

    root: Path
    nodes: list[NetnsNode]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def client(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30):
        """A Slurm client command on node0 (the machine has no route to the nodes' addresses)."""
        return subprocess.run(
            self.nodes[0].command(argv), env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts += [f"--- {path} ---", tail(path.read_text(errors="replace"), 15)]
        return "\n".join(parts)

    def daemons(self) -> list[str]:
        """The daemons of this cluster still running, by their pid files."""
        alive = []
        for pid_file in self.root.glob("*.pid"):
            pid = pid_file.read_text().strip()
            if pid and Path(f"/proc/{pid}").exists():
                alive.append(f"{pid_file.stem} (pid {pid})")
        return alive


@contextlib.contextmanager
def slurm_cluster_on(count: int, root: Path) -> Iterator[SlurmCluster]:
    """A Slurm cluster of `count` namespace nodes (scripts/slurm_two_nodes.sh, state in `root`), every node idle;
    stopped, and the nodes destroyed, however the body ends."""
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)} on PATH): run scripts/ci_slurm.sh")
    with netns_nodes(count) as nodes:
        cluster = SlurmCluster(root, nodes)
        env = {**os.environ, "NETNS_PREFIX": nodes[0].prefix, "NETNS_SUBNET": nodes[0].address.rsplit(".", 1)[0]}
        try:
            started = subprocess.run([str(SLURM_SCRIPT), "start", str(root)], env=env, capture_output=True, text=True)
            assert started.returncode == 0, f"slurm_two_nodes.sh start failed:\n{started.stderr}\n{cluster.logs()}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while (states := _node_states(cluster)) != {f"node{i}": "idle" for i in range(count)}:
                if time.monotonic() > deadline:
                    pytest.fail(f"the nodes are {states} after {START_TIMEOUT_S} s, not idle\n{cluster.logs()}")
                time.sleep(0.5)
            yield cluster
        finally:
            stopped = subprocess.run([str(SLURM_SCRIPT), "stop", str(root)], env=env, capture_output=True, text=True)
            left = cluster.daemons()
            assert stopped.returncode == 0 and not left, f"the cluster left {left}:\n{stopped.stderr}"
    # netns_nodes has destroyed the nodes with anything left in them (job steps included) and checked that no
    # namespace or shared-memory buffer of theirs is left.


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with slurm_cluster_on(NODES, tmp_path_factory.mktemp("slurm_two_nodes")) as cluster:
        yield cluster


def _node_states(cluster: SlurmCluster) -> dict[str, str]:
    result = cluster.client(["sinfo", "--noheader", "--Node", "--format=%N %T"], timeout=10)
    return dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)


@contextlib.contextmanager
def submitted_on(
    cluster: SlurmCluster, run_dir: Path, job_name: str, overrides: list[str], runs: int = 1
) -> Iterator[SlurmJob]:
    """`sbatch --nodes=2 launch/slurm.sbatch` of the ZeRO-3 run with `overrides`, one CPU rank per node, submitted on
    node0 from `run_dir`/submit; the run in `run_dir`/run, its data cache in `run_dir`/cache. The job gets `runs` times
    `DISTRIBUTED_TIMEOUT_S` (a requeued job runs more than once) and is cancelled on the way out if still there."""
    submit_dir, output_dir = run_dir / "submit", run_dir / "run"
    (submit_dir / "logs").mkdir(parents=True)  # where the script's #SBATCH --output puts the job log
    env = {
        **cluster.env(),
        "REPO_DIR": str(REPO_ROOT),
        "OUTPUT_DIR": str(output_dir),
        "PYTHON": sys.executable,
        "NUM_GPUS": "1",
        "CPU_THREADS_PER_RANK": THREADS,
    }
    command = [
        "sbatch", "--parsable", f"--nodes={NODES}", "--gpus-per-node=0", f"--partition={PARTITION}",
        f"--time={TIME_LIMIT_MIN}", f"--job-name={job_name}", str(LAUNCH_DIR / "slurm.sbatch"), *RUN,
        f"data.cache_dir={run_dir / 'cache'}", *overrides,
    ]  # fmt: skip
    submitted = cluster.client(command, env=env, cwd=submit_dir)
    assert submitted.returncode == 0, f"sbatch failed:\n{submitted.stdout}{submitted.stderr}\n{cluster.logs()}"
    job_id = submitted.stdout.strip().split(";")[0]
    job = SlurmJob(
        id=job_id,
        log=submit_dir / "logs" / f"{job_name}-{job_id}.out",
        output_dir=output_dir,
        env=env,
        deadline=time.monotonic() + runs * DISTRIBUTED_TIMEOUT_S,
        client=lambda argv, env: cluster.client(argv, env=env),
        log_dirs=[cluster.root],
    )
    try:
        yield job
    finally:
        job.cancel()


@pytest.fixture(scope="module")
def sbatch_on_two_nodes(
    slurm_two_nodes: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path
) -> tuple[Path, Path, dict[str, str], str]:
    """`sbatch --nodes=2 launch/slurm.sbatch` of the ZeRO-3 run, one CPU rank per node, submitted on node0 and waited
    for; the output dir, the data cache, the job's final `scontrol show job` fields and its log."""
    run_dir = tmp_path_factory.mktemp("slurm_two_nodes_run")
    with submitted_on(slurm_two_nodes, run_dir, "two-nodes", []) as job:
        info, states = job.wait_until_done()
    assert info["JobState"] == "COMPLETED", f"job {job.id} {info['JobState']} {info['ExitCode']} after {states}\n" + (
        job.describe()
    )
    return job.output_dir, run_dir / "cache", info, job.log.read_text()


def test_sbatch_on_two_nodes_trains_as_two_ranks_on_one_node(
    slurm_two_nodes: SlurmCluster,
    sbatch_on_two_nodes: tuple[Path, Path, dict[str, str], str],
    base_model_dir: Path,
    zero3_deepspeed_run: LaunchedRun,
) -> None:
    output_dir, _, info, log = sbatch_on_two_nodes
    # Slurm gave the job both nodes, and slurm.sbatch took the first as the rendezvous host, by name.
    assert info["NodeList"] == "node[0-1]" and info["NumNodes"] == str(NODES), info
    assert re.search(r"^job \d+ \(restart 0\) on node\[0-1\]: rank 0 at node0:\d+,", log, re.MULTILINE), tail(log)
    # srun started the step's task on node1 through node1's slurmd (its log, by the NodeName in its file name).
    node1_log = (slurm_two_nodes.root / "slurmd-node1.log").read_text(errors="replace")
    assert f"launch task StepId={info['JobId']}.0 " in node1_log, tail(node1_log)
    check_saved_run(output_dir, base_model_dir, ranks=2)
    assert_same_training(output_dir, zero3_deepspeed_run.output_dir, atol=0.0)


def test_sbatch_on_two_nodes_prepares_the_data_once(sbatch_on_two_nodes: tuple[Path, Path, dict[str, str], str]):
    output_dir, cache_dir, _, _ = sbatch_on_two_nodes
    assert_prepared_once(output_dir, cache_dir)


# A lost node: Slurm declares it DOWN after SlurmdTimeout without an answer (scripts/slurm_two_nodes.sh sets 20 s) and
# ends its job NODE_FAIL, killing what is left on the other nodes. The ranks' own timeout is far longer, so that the
# node, not a rank, is found lost first (as on a cluster: ddp_timeout 1800 s, SlurmdTimeout 300 s by default).
LOST_NODE_DDP_TIMEOUT_S = 600
LOSE_AFTER_STEP = 5  # past checkpoint-4, which the requeued job resumes from


def assert_resumed(job: SlurmJob, info: dict[str, str], states: list[str], nodes: str, step: int = 4) -> None:
    """The job ran twice, the second time on `nodes`, resuming from checkpoint-`step`, and ended as the uninterrupted
    2-rank run: the same losses and weights, bound 0 (the resume restores the weights, optimizer, schedule, RNG and
    data position exactly, and 2 ranks on 2 nodes sum as 2 ranks on one, see the module's docstring)."""
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (
        f"{info['JobState']} {info['ExitCode']}, requeued {info['Restarts']} times, after {states}\n{job.describe()}"
    )
    assert info["NodeList"] == nodes, info
    first, second = runs_of(job.log.read_text(), job.id)
    assert "on node[0-1]" in first and "starting fresh" in first, tail(first)
    assert f"(restart 1) on {nodes}: rank 0 at node0:" in second, tail(second)
    assert f"resuming from {job.output_dir / f'checkpoint-{step}'}" in second, tail(second)


def test_lost_node_requeues_the_job_which_resumes_on_a_spare_node(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, zero3_deepspeed_run: LaunchedRun
) -> None:
    """On 3 nodes, a 2-node job loses node1 mid-run (its network down, then every process on it killed: a machine that
    died). Slurm finds it DOWN and requeues the job (#SBATCH --requeue), which starts again on node0 and the spare
    node2 and resumes from checkpoint-4 to the uninterrupted run's losses and weights."""
    with slurm_cluster_on(3, tmp_path_factory.mktemp("slurm_three_nodes")) as cluster:
        _, lost, spare = cluster.nodes
        overrides = [f"training.ddp_timeout={LOST_NODE_DDP_TIMEOUT_S}"]
        with submitted_on(cluster, tmp_path_factory.mktemp("lost_node_run"), "lost-node", overrides, runs=2) as job:
            job.wait_for_step(LOSE_AFTER_STEP)
            first_nodes = job.info()["NodeList"]
            lost.disconnect()
            lost.kill()
            info, states = job.wait_until_done()
        slurmctld_log = (cluster.root / "slurmctld.log").read_text(errors="replace")
    assert first_nodes == "node[0-1]", first_nodes
    assert_resumed(job, info, states, nodes=f"node[0,{spare.index}]")
    assert re.search(r"requeue.*node1|node1.*requeue", slurmctld_log, re.IGNORECASE), tail(slurmctld_log, 40)
    check_saved_run(job.output_dir, base_model_dir, ranks=2)
    assert_same_training(job.output_dir, zero3_deepspeed_run.output_dir, atol=0.0)


SLURM_DAEMONS = {"munged", "slurmctld", "slurmd", "slurmstepd"}


def test_killed_ranks_of_a_node_requeue_the_job_which_resumes(
    slurm_two_nodes: SlurmCluster, tmp_path: Path, base_model_dir: Path, zero3_deepspeed_run: LaunchedRun
) -> None:
    """node1's launcher and rank killed mid-run, its machine and slurmd alive (a crash, the out-of-memory killer):
    node0's rank loses contact at once and leaves lost_node.json naming node1, srun ends the step, and slurm.sbatch
    requeues the job, which resumes from checkpoint-4 on both nodes to the uninterrupted run's losses and weights."""
    _, node1 = slurm_two_nodes.nodes
    overrides = [f"training.ddp_timeout={LOST_NODE_DDP_TIMEOUT_S}"]
    with submitted_on(slurm_two_nodes, tmp_path, "killed-ranks", overrides, runs=2) as job:
        job.wait_for_step(LOSE_AFTER_STEP)
        for pid in node1.processes():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if Path(f"/proc/{pid}/comm").read_text().strip() not in SLURM_DAEMONS:
                    os.kill(pid, signal.SIGKILL)
        info, states = job.wait_until_done()
    assert_resumed(job, info, states, nodes="node[0-1]")
    first, _ = runs_of(job.log.read_text(), job.id)
    assert re.search(r'slurm.sbatch: a node was lost \(\{"lost": \["node1 \(' + re.escape(node1.address), first), tail(
        first
    )
    assert "; requeue 1 of 10" in first, tail(first)
    check_saved_run(job.output_dir, base_model_dir, ranks=2)
    assert_same_training(job.output_dir, zero3_deepspeed_run.output_dir, atol=0.0)


PREEMPT_AFTER_STEP = 3  # the ranks stop at a later step, before the last (8)


def test_preempted_job_on_two_nodes_stops_both_nodes_requeues_and_resumes(
    slurm_two_nodes: SlurmCluster, tmp_path: Path, base_model_dir: Path, zero3_deepspeed_run: LaunchedRun
) -> None:
    """Slurm's time-limit warning (SIGUSR1 to the batch shell) on a 2-node job: srun passes it to both nodes' launchers
    and ranks, which agree on a step, save a checkpoint there and exit 75; slurm.sbatch requeues the job, which
    resumes from that checkpoint on both nodes to the uninterrupted run's losses and weights."""
    with submitted_on(slurm_two_nodes, tmp_path, "preempted", [], runs=2) as job:
        job.wait_for_step(PREEMPT_AFTER_STEP)
        signalled = slurm_two_nodes.client(["scancel", "--signal=USR1", "--batch", job.id], env=job.env)
        assert signalled.returncode == 0, signalled.stderr
        info, states = job.wait_until_done()
    first, _ = runs_of(job.log.read_text(), job.id)
    stops = re.findall(r"cluster.resilience: Preempted: stopped at step (\d+)", first)
    assert len(stops) == 2 and len(set(stops)) == 1, f"not both ranks stopped at one step: {stops}\n{tail(first)}"
    step = int(stops[0])
    assert PREEMPT_AFTER_STEP < step < 8, step
    assert f'slurm.sbatch: preempted ({{"step": {step}, ' in first and "; requeue 1 of 10" in first, tail(first)
    assert_resumed(job, info, states, nodes="node[0-1]", step=step)
    check_saved_run(job.output_dir, base_model_dir, ranks=2)
    assert_same_training(job.output_dir, zero3_deepspeed_run.output_dir, atol=0.0)
