"""Beyond one machine: the same job as two "nodes" of one rank each, started the way a cluster starts them,
gives the losses of one process with the same global batch; its checkpoint resumes on two nodes and on one.

Both launchers' multi-node paths, with no ssh and no scheduler (what a Slurm or Kubernetes job runs on each
node), here as two launcher processes on this machine talking over gloo on 127.0.0.1:

* DeepSpeed's runner: ``deepspeed --hostfile H --no_ssh --node_rank {0,1} --master_addr ... --master_port ...``
  (H names two hosts with one slot each; with ``--no_ssh`` each node starts its own ranks);
* ``torchrun --nnodes 2 --node_rank {0,1} --nproc_per_node 1 --master_addr ... --master_port ...``.

The output dir is shared by the nodes, as a multi-node job's must be (a shared filesystem): rank 0 writes
the logs and exports, every rank its own ZeRO partition."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from test_train_fixtures import REPO, losses, run_train, write_shards

pytestmark = pytest.mark.slow

ARGS = ["model=llama-tiny", "max_steps=6", "global_batch_size=4", "micro_batch_size=2", "lr=3e-3",
        "warmup_ratio=0.2", "log_every=1", "save_every=2", "eval_every=0", "report_to=none", "keep_last=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(cmd_of_rank, timeout: int = 600) -> list[str]:
    """Starts the two nodes' launcher commands at once; waits for both; their outputs (asserts exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen(cmd_of_rank(r), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {r} exited {p.returncode}:\n{out[-5000:]}"
    return outs


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir):
    return write_shards(tokenizer_dir, tmp_path_factory.mktemp("mn_data") / "pt", "pt")


def test_two_nodes_equal_one_process_and_resume(data, tmp_path):
    """ZeRO-2: both launchers' two-node runs give the one-process losses and each node writes its own optimizer
    partition; the two-node job's step-4 checkpoint resumes to the straight run's losses on two nodes, and on one
    node through a universal checkpoint (DeepSpeed cannot re-slice a ZeRO optimizer state for another world size,
    so rank 0 converts it once)."""
    args = [f"data_dir={data}", *ARGS, "ds_config=ds_configs/zero2.json"]
    run_train([*args, f"output_dir={tmp_path / 'one'}"])
    ref = losses(tmp_path / "one")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    script = str(REPO / "training" / "train.py")
    runs = {"deepspeed": lambda r, port, extra: [
                sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--no_ssh",
                "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port), script, *extra],
            "torchrun": lambda r, port, extra: [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), script, *extra]}
    for name, cmd in runs.items():
        out, port = tmp_path / name, _free_port()
        logs = _two_nodes(lambda r: cmd(r, port, [*args, f"output_dir={out}"]))
        job = json.loads((out / "job.json").read_text())
        assert job["world_size"] == 2 and job["gradient_accumulation_steps"] == 1, (name, job)
        got = losses(out)
        assert sorted(got) == sorted(ref), (name, got)
        for s in ref:
            assert abs(ref[s] - got[s]) <= 1e-4, (name, s, ref[s], got[s])
        assert "step      6/6" in logs[0] and "step      6/6" not in logs[1], name  # rank 0 logs
        parts = sorted(p.name for p in (out / "checkpoints" / "step-00000006").glob("*optim_states.pt"))
        assert len(parts) == 2, parts  # each node wrote its own ZeRO partition into the shared dir

    step4 = tmp_path / "deepspeed" / "checkpoints" / "step-00000004"
    # on one node: converted once into a universal checkpoint, then steps 5 and 6 are the straight run's
    p = run_train(["--resume", str(step4), *args, f"output_dir={tmp_path / 'one_node'}"])
    assert "into a universal checkpoint" in p.stdout, p.stdout[-3000:]
    assert (step4 / "universal" / step4.name / "zero").is_dir()
    got = losses(tmp_path / "one_node")
    assert sorted(got) == [5, 6], got
    for s in (5, 6):
        assert abs(ref[s] - got[s]) <= 1e-4, (s, ref[s], got[s])
    # on two nodes (the other launcher, a fresh output dir): steps 5 and 6 are the straight run's
    resumed, port = tmp_path / "resumed", _free_port()
    _two_nodes(lambda r: runs["torchrun"](r, port, ["--resume", str(step4), *args, f"output_dir={resumed}"]))
    got = losses(resumed)
    assert sorted(got) == [5, 6], got
    for s in (5, 6):
        assert abs(ref[s] - got[s]) <= 1e-4, (s, ref[s], got[s])


def test_a_node_that_cannot_reach_node_0_stops_in_one_line(data, tmp_path):
    """Node 1 of a two-node job whose --master_addr:--master_port nobody answers (a wrong address, a host it cannot
    reach, node 0 never started): one line naming the fix after rendezvous_timeout_s, not torch's silent
    30-minute wait, and no model is loaded."""
    port = _free_port()   # nobody listens here
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--no_ssh",
                        "--node_rank", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                        str(REPO / "training" / "train.py"), f"data_dir={data}", *ARGS, "rendezvous_timeout_s=3",
                        f"output_dir={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if "error: rank 1 of 2" in ln)
    assert f"127.0.0.1:{port} did not answer within 3 s" in line and "Fix: start node 0" in line, line
    assert "Traceback" not in out and "parameters" not in out, out[-3000:]
