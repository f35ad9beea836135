"""Two nodes, one CPU rank each, training the embedded default with ZeRO-3 as a cluster job does.

Each node is a network namespace of this machine with its own interface, address, hostname and /etc/hosts
(scripts/netns_nodes.sh, through `netns_nodes`), so the ranks meet over a network between hosts, never 127.0.0.1:
MASTER_ADDR is node 0's address. The disk is shared, as a cluster's filesystem is: so are output_dir and
data.cache_dir. launch/multi_node.sh runs as a user would run it: on each node under torchrun (NNODES=2, NODE_RANK);
on each node under the DeepSpeed launcher with a hostfile and no ssh (NO_SSH=1); and on node 0 only, where the
DeepSpeed launcher starts both nodes over ssh with pdsh (an sshd on each node, `start_sshd`).

Each run must train exactly as the same 2 ranks on one node do, to the bit. The runs differ in how the ranks' sums
travel: gloo over the nodes' network, against gloo over loopback (torchrun) or DeepSpeed's shared-memory all-reduce
(its launcher on one node). With 2 ranks each all-reduced or reduce-scattered element is one float32 addition of two
values, and IEEE addition is commutative, so the order in which the two arrive cannot change a bit. The rest is the
same: data order, micro-batches, and each rank's thread count (the cores split between the 2 nodes, as the one-node
launch splits them between its 2 ranks), so the kernels sum in the same order too. So the bound is 0: any difference
means something besides the transport changed. (With n > 2 ranks a sum of n terms may round differently by about
eps * sqrt(n) relative, and the bound would follow tests/dft/test_split_invariance.py.)

Data preparation across nodes: with a fresh data.cache_dir, exactly one rank tokenises and the other, on the other
node, waits on the cache's file lock over the shared disk and reuses the result (each rank's log says which).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.distributed import LOST_NODE_MARKER
from tests.helpers import (
    COMPARABLE_RUN,
    DISTRIBUTED_TIMEOUT_S,
    GLOBAL_BATCH,
    LAST_STEP,
    LAUNCH_DIR,
    NO_HELDOUT,
    REPO_ROOT,
    LaunchedRun,
    NetnsNode,
    assert_prepared_once,
    assert_same_training,
    assert_same_zero3_state,
    check_saved_run,
    cores_per_node,
    describe_run,
    launch_environment,
    logged_steps,
    make_interrupted_copy,
    netns_missing,
    netns_nodes,
    run_on_nodes,
    start_sshd,
)

# Before any fixture: the one-node reference is a session fixture, made before the module's nodes would skip.
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(bool(netns_missing()), reason=netns_missing())]

NODES = 2
RUN = ("deepspeed=zero3", *COMPARABLE_RUN, NO_HELDOUT)
# Each rank's threads: this machine's cores split between the 2 nodes, as launch/env.sh splits them between 2 ranks on
# one node (the one-node references), so every run's kernels sum in the same order.
THREADS = str(cores_per_node(NODES))


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[NetnsNode]]:
    with netns_nodes(NODES) as made:
        yield made


def launch_on(nodes: list[NetnsNode], run_dir: Path, env: dict[str, str]) -> tuple[Path, Path, list[str]]:
    """launch/multi_node.sh on each of `nodes` with its NODE_RANK and `env`, MASTER_ADDR node 0's address, and a
    fresh data cache under `run_dir`; the output dir, the cache and each node's launcher output."""
    output_dir, cache_dir = run_dir / "run", run_dir / "cache"
    command = [str(LAUNCH_DIR / "multi_node.sh"), *RUN, f"output_dir={output_dir}", f"data.cache_dir={cache_dir}"]
    outputs = run_on_nodes(
        [(node, command, {**env, "NODE_RANK": str(node.index), "MASTER_ADDR": nodes[0].address}) for node in nodes],
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[output_dir / "logs"],
    )
    return output_dir, cache_dir, outputs


def hostfile_environment(nodes: list[NetnsNode], run_dir: Path) -> dict[str, str]:
    """A DeepSpeed hostfile of one slot per node, and the environment that launches with it."""
    hostfile = run_dir / "hostfile"
    hostfile.write_text("".join(f"{node.hostname} slots=1\n" for node in nodes))
    # The DeepSpeed launcher leaves the thread count to the caller, as on a cluster.
    return {**launch_environment(), "HOSTFILE": str(hostfile), "OMP_NUM_THREADS": THREADS}


@pytest.fixture(scope="module")
def torchrun_on_two_nodes(
    nodes: list[NetnsNode], tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path
) -> tuple[Path, Path, list[str]]:
    """NNODES=2 launch/multi_node.sh on each node: torchrun's rendezvous at node 0's address."""
    env = {**launch_environment(), "NNODES": str(NODES), "NUM_GPUS": "1", "CPU_THREADS_PER_RANK": THREADS}
    return launch_on(nodes, tmp_path_factory.mktemp("torchrun_two_nodes"), env)


@pytest.fixture(scope="module")
def deepspeed_on_two_nodes(
    nodes: list[NetnsNode], tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path
) -> tuple[Path, Path, list[str]]:
    """HOSTFILE=... NO_SSH=1 launch/multi_node.sh on each node: the DeepSpeed launcher on every node, no ssh."""
    run_dir = tmp_path_factory.mktemp("deepspeed_two_nodes")
    return launch_on(nodes, run_dir, {**hostfile_environment(nodes, run_dir), "NO_SSH": "1"})


@pytest.fixture(scope="module")
def deepspeed_over_ssh(
    nodes: list[NetnsNode], tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path
) -> tuple[Path, Path, list[str]]:
    """HOSTFILE=... launch/multi_node.sh on node 0 only: the DeepSpeed launcher starts both nodes over ssh (pdsh)."""
    start_sshd(nodes)
    run_dir = tmp_path_factory.mktemp("deepspeed_over_ssh")
    output_dir, cache_dir, (console,) = launch_on(nodes[:1], run_dir, hostfile_environment(nodes, run_dir))
    # pdsh prefixes what each host prints with its name: node 1's ranks were started there, over ssh.
    assert "\nnode1: " in console, f"nothing came back from node1 over pdsh:\n{console[-3000:]}"
    return output_dir, cache_dir, [console]


def test_torchrun_across_two_nodes_trains_as_two_ranks_on_one_node(
    nodes: list[NetnsNode], torchrun_on_two_nodes: tuple[Path, Path, list[str]], base_model_dir: Path, tmp_path: Path
) -> None:
    output_dir, cache_dir, _ = torchrun_on_two_nodes
    check_saved_run(output_dir, base_model_dir, ranks=2)
    one_node = tmp_path / "one_node"
    env = {**launch_environment(), "NNODES": "1", "NUM_GPUS": "2", "CPU_THREADS_PER_RANK": THREADS}
    command = [str(LAUNCH_DIR / "multi_node.sh"), *RUN, f"output_dir={one_node}", f"data.cache_dir={cache_dir}"]
    run_on_nodes([(nodes[0], command, env)], timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[one_node / "logs"])
    assert_same_training(output_dir, one_node, atol=0.0)


@pytest.mark.parametrize("launch", ["deepspeed_on_two_nodes", "deepspeed_over_ssh"])
def test_deepspeed_launcher_across_two_nodes_trains_as_on_one_node(
    launch: str, request: pytest.FixtureRequest, base_model_dir: Path, zero3_deepspeed_run: LaunchedRun
) -> None:
    output_dir, _, _ = request.getfixturevalue(launch)
    check_saved_run(output_dir, base_model_dir, ranks=2)
    assert_same_training(output_dir, zero3_deepspeed_run.output_dir, atol=0.0)


@pytest.mark.parametrize("launch", ["torchrun_on_two_nodes", "deepspeed_on_two_nodes", "deepspeed_over_ssh"])
def test_one_rank_prepares_the_data_and_the_other_node_reuses_it(launch: str, request: pytest.FixtureRequest) -> None:
    output_dir, cache_dir, _ = request.getfixturevalue(launch)
    assert_prepared_once(output_dir, cache_dir)


def test_checkpoint_of_two_nodes_resumes_on_one_node_with_its_optimizer_state(
    nodes: list[NetnsNode],
    torchrun_on_two_nodes: tuple[Path, Path, list[str]],
    one_rank_zero3_run: Path,
    tmp_path: Path,
) -> None:
    """A requeue onto fewer nodes: the 2-node torchrun run's checkpoint-4, resumed on node0 alone (1 rank, the same
    global batch), continues as the uninterrupted 1-rank run, optimizer state included, within the bounds of
    tests/cluster/test_resume_world_size.py (the ZeRO-3 shards go through a universal checkpoint)."""
    output_dir, cache_dir, _ = torchrun_on_two_nodes
    resumed = tmp_path / "resumed"
    make_interrupted_copy(output_dir, resumed)
    env = {**launch_environment(), "NNODES": "1", "NUM_GPUS": "1", "CPU_THREADS_PER_RANK": THREADS}
    command = [
        str(LAUNCH_DIR / "multi_node.sh"), *RUN, f"training.per_device_train_batch_size={GLOBAL_BATCH}",
        "training.resume_from_checkpoint=auto", f"output_dir={resumed}", f"data.cache_dir={cache_dir}",
    ]  # fmt: skip
    (console,) = run_on_nodes([(nodes[0], command, env)], timeout=DISTRIBUTED_TIMEOUT_S, log_dirs=[resumed / "logs"])
    assert "Resuming on 1 rank(s) a checkpoint of 2" in console, console[-3000:]
    assert_same_training(resumed, one_rank_zero3_run, atol=1e-5)
    last = f"checkpoint-{LAST_STEP}"
    assert_same_zero3_state(resumed / last, one_rank_zero3_run / last, step=LAST_STEP, rtol=1e-5)


def test_checkpoint_of_one_node_resumes_on_two_nodes_with_its_optimizer_state(
    nodes: list[NetnsNode],
    one_rank_zero3_run: Path,
    zero3_deepspeed_run: LaunchedRun,
    torchrun_on_two_nodes: tuple[Path, Path, list[str]],
    tmp_path: Path,
) -> None:
    """A requeue onto more nodes: the 1-rank run's checkpoint-4 (its batch that of 2 ranks), resumed by torchrun on
    both nodes, continues as the uninterrupted 2-rank run, optimizer state included, within the bounds of
    tests/cluster/test_resume_world_size.py."""
    _, cache_dir, _ = torchrun_on_two_nodes  # the same data, prepared: this test resumes, it does not tokenise
    resumed = tmp_path / "resumed"
    make_interrupted_copy(one_rank_zero3_run, resumed)
    env = {**launch_environment(), "NNODES": str(NODES), "NUM_GPUS": "1", "CPU_THREADS_PER_RANK": THREADS}
    command = [
        str(LAUNCH_DIR / "multi_node.sh"), *RUN, "training.resume_from_checkpoint=auto", f"output_dir={resumed}",
        f"data.cache_dir={cache_dir}",
    ]  # fmt: skip
    consoles = run_on_nodes(
        [(node, command, {**env, "NODE_RANK": str(node.index), "MASTER_ADDR": nodes[0].address}) for node in nodes],
        timeout=DISTRIBUTED_TIMEOUT_S,
        log_dirs=[resumed / "logs"],
    )
    assert "Resuming on 2 rank(s) a checkpoint of 1" in consoles[0], consoles[0][-3000:]
    assert_same_training(resumed, zero3_deepspeed_run.output_dir, atol=1e-5)
    last = f"checkpoint-{LAST_STEP}"
    assert_same_zero3_state(resumed / last, zero3_deepspeed_run.output_dir / last, step=LAST_STEP, rtol=1e-5)


# Node loss: short enough for a test, long enough that a loaded machine's slow step is not mistaken for a lost node.
LOST_NODE_TIMEOUT_S = 60
EXIT_GRACE_S = 60  # after the timeout: the launcher ends its ranks and exits


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed_no_ssh"])
def test_node_loss_ends_every_launcher_and_names_the_lost_node(
    base_model_dir: Path, tmp_path: Path, launcher: str
) -> None:
    """node1's launcher and rank killed mid-run: node0's rank stops and its launcher exits (within ddp_timeout, not a
    hang), naming node1 and its address, and no process is left on node0; under torchrun and under the DeepSpeed
    launcher on every node (a hostfile, NO_SSH=1)."""
    output_dir = tmp_path / "run"
    command = [
        str(LAUNCH_DIR / "multi_node.sh"), "deepspeed=zero3", "debug=quick", "training.max_steps=100000",
        "training.logging_steps=1", "training.eval_strategy=no", "training.save_strategy=no", NO_HELDOUT,
        f"training.ddp_timeout={LOST_NODE_TIMEOUT_S}", f"output_dir={output_dir}",
    ]  # fmt: skip
    with netns_nodes(NODES) as lost_nodes, contextlib.ExitStack() as stack:
        node0, node1 = lost_nodes
        env = {**launch_environment(), "NNODES": str(NODES), "NUM_GPUS": "1", "CPU_THREADS_PER_RANK": THREADS}
        if launcher == "deepspeed_no_ssh":
            env.update(hostfile_environment(lost_nodes, tmp_path), NO_SSH="1")
        outputs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in lost_nodes]
        launchers = [
            subprocess.Popen(
                node.command(command), cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, text=True,
                env={**env, "NODE_RANK": str(node.index), "MASTER_ADDR": node0.address}, start_new_session=True,
            )
            for node, output in zip(lost_nodes, outputs, strict=True)
        ]  # fmt: skip

        def console(index: int) -> str:
            outputs[index].seek(0)
            return describe_run(
                outputs[index].read(), [output_dir / "logs"], f"{lost_nodes[index].hostname}'s launcher"
            )

        deadline = time.monotonic() + DISTRIBUTED_TIMEOUT_S
        while len(logged_steps(output_dir)) < 2:
            assert all(launcher.poll() is None for launcher in launchers), f"a launcher ended early:\n{console(0)}"
            assert time.monotonic() < deadline, f"no training step in {DISTRIBUTED_TIMEOUT_S} s:\n{console(0)}"
            time.sleep(0.5)
        node1.kill()
        try:
            status = launchers[0].wait(timeout=LOST_NODE_TIMEOUT_S + EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node0's launcher still runs {LOST_NODE_TIMEOUT_S + EXIT_GRACE_S} s after node1 was lost\n"
                        f"{console(0)}")  # fmt: skip
        launchers[1].wait(timeout=EXIT_GRACE_S)
        left = node0.processes()
        text = console(0)
    assert status != 0, text
    assert f"Lost contact with node1 ({node1.address}) on node0" in text, text
    marker = json.loads((output_dir / LOST_NODE_MARKER).read_text())  # what launch/slurm.sbatch requeues on
    assert (marker["lost"], marker["seen_on"]) == ([f"node1 ({node1.address})"], "node0"), marker
    assert not left, f"processes {left} were left on node0 after its launcher exited"
