"""Launchers: --dry-run output and input validation of every script; launch/slurm.sbatch run for
real under stand-in srun/scontrol (tests/fake_slurm: 2 "nodes" x 1 gloo process), preempted,
requeued and resumed; a rank killed mid-run and the job resuming from its last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from conftest import REPO, free_port, tiny_overrides
from megalong.checkpoint import step as ckpt
from megalong.checkpoint.layout import META
from megalong.checkpoint.layout import find_latest

LAUNCH = REPO / "launch"
FAKE_SLURM = REPO / "tests" / "fake_slurm"


def _bash(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={**os.environ, **(env or {})})


def _slurm_env(tmp_path: Path, **extra) -> dict:
    return {"PATH": f"{FAKE_SLURM}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "t",
            "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "FAKE_SLURM_HOSTS": "127.0.0.1 127.0.0.1",
            "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log"), "RUN_DIR": str(tmp_path / "run"),
            "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", **extra}


def _data_config(tiny_data, tmp_path: Path) -> str:
    """A config beside configs/tiny-cpu.yaml that the launchers' pre-flight check accepts for up
    to 32 processes: the tiny data, and a batch that divides."""
    path = tmp_path / "data.yaml"
    path.write_text(f"data: {{tokenizer: {tiny_data.tokenizer}, train: [{tiny_data.prefix}]}}\n"
                    f"train: {{global_batch_size: 64, micro_batch_size: 2}}\n")
    return str(path)


def test_torchrun_dry_run_and_validation(tiny_data, tmp_path):
    data = _data_config(tiny_data, tmp_path)
    single = _bash("torchrun.sh", "--nproc", "2", "--dry-run", "configs/tiny-cpu.yaml", data, "--set", "train.lr=1e-3")
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip().endswith("-m torch.distributed.run --standalone --nproc_per_node 2 -m "
                                          f"megalong.cli train configs/tiny-cpu.yaml {data} --set train.lr=1e-3")
    multi = _bash("torchrun.sh", "--nproc", "8", "--nnodes", "4", "--node-rank", "2", "--rdzv-endpoint",
                  "node001:29400", "--dry-run", "configs/tiny-cpu.yaml", data)
    assert multi.returncode == 0, multi.stderr
    assert ("-m torch.distributed.run --nnodes 4 --node_rank 2 --rdzv_backend static --rdzv_endpoint "
            f"node001:29400 --nproc_per_node 8 -m megalong.cli train configs/tiny-cpu.yaml {data}"
            ) in multi.stdout
    # The config is validated once, for nproc x nnodes processes, before torchrun would start.
    proc = _bash("torchrun.sh", "--nproc", "8", "--nnodes", "8", "--node-rank", "0", "--rdzv-endpoint", "h:1",
                 "--dry-run", "configs/tiny-cpu.yaml", data)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.strip().endswith(
        "megalong: config error: train.global_batch_size: 64 is not a multiple of train.micro_batch_size "
        "x data-parallel size = 2 x 64"), proc.stderr
    proc = _bash("torchrun.sh", "configs/tiny-cpu.yaml", data, "--set", "train.adam_beta2=1")  # no dry run
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert proc.stderr.strip().endswith("megalong: config error: train.adam_beta2: must be in [0, 1), got 1.0")
    for args, message in [
        (["--nproc", "0"], "--nproc must be a positive integer, got '0'"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1"], "--nnodes 2 needs --node-rank"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank must be an integer in 0..1"),
        (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "nohost"], "--rdzv-endpoint must be HOST:PORT"),
        (["--node-rank", "1"], "--node-rank and --rdzv-endpoint need --nnodes > 1"),
    ]:
        proc = _bash("torchrun.sh", *args, "--dry-run", "configs/tiny-cpu.yaml")
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = _bash("torchrun.sh", "--dry-run", "configs/missing.yaml")
    assert proc.returncode == 2 and "config file not found: configs/missing.yaml" in proc.stderr


def test_slurm_dry_run_and_validation(tiny_data, tmp_path):
    data = _data_config(tiny_data, tmp_path)
    env = _slurm_env(tmp_path, MASTER_PORT="29511", GPUS_PER_NODE="8", RUN_DIR="runs/x")
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", data, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "job 77: 2 nodes (127.0.0.1 127.0.0.1), 8 processes each, rendezvous 127.0.0.1:29511"
    assert lines[1] == "checkpoints: runs/x/checkpoints   logs: runs/x/logs"
    assert lines[2] == (
        f"srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 --output runs/x/logs/%j-node%n.log bash -c "
        f"bash {LAUNCH}/torchrun.sh --nproc 8 --nnodes 2 --node-rank $SLURM_NODEID --rdzv-endpoint 127.0.0.1:29511 "
        f"configs/tiny-cpu.yaml {data} --set train.save_dir=runs/x/checkpoints --set train.load=auto ")
    assert not (tmp_path / "scontrol.log").exists()
    no_job = {k: v for k, v in env.items()}
    no_job["SLURM_JOB_ID"] = ""
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", env=no_job)
    assert proc.returncode == 2 and "SLURM_JOB_ID is not set" in proc.stderr
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", env={**env, "SLURM_NNODES": "3"})
    assert proc.returncode == 2 and "scontrol lists 2 hosts but the job has 3 nodes" in proc.stderr
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", env={**env, "GPUS_PER_NODE": "0"})
    assert proc.returncode == 2 and "GPUS_PER_NODE must be a positive integer" in proc.stderr
    proc = _bash("slurm.sbatch", "--dry-run", env=env)
    assert proc.returncode == 2 and "no config given" in proc.stderr
    # sbatch runs a spooled copy of the script; the launcher is found from the submit directory
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", env={**env, "SLURM_SUBMIT_DIR": "/nowhere"})
    assert proc.returncode == 2 and "/nowhere/launch/torchrun.sh not found: submit from the repository root" in proc.stderr
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", data, env={**env, "SLURM_SUBMIT_DIR": str(REPO)})
    assert proc.returncode == 0 and f"bash -c bash {REPO}/launch/torchrun.sh --nproc 8" in proc.stdout
    # --nproc instead of GPUS_PER_NODE, refused at once when it is not a positive number
    proc = _bash("slurm.sbatch", "--dry-run", "--nproc", "2", "configs/tiny-cpu.yaml", data, env=env)
    assert proc.returncode == 0 and "2 nodes (127.0.0.1 127.0.0.1), 2 processes each" in proc.stdout
    proc = _bash("slurm.sbatch", "--nproc", "0", "configs/tiny-cpu.yaml", data, env={})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "megalong: launch error: launch/slurm.sbatch: --nproc must be a positive integer, got '0'")
    # one node: torchrun standalone, without --nnodes/--node-rank/--rdzv-endpoint
    one = {**env, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "FAKE_SLURM_HOSTS": "127.0.0.1"}
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", data, env=one)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "job 77: 1 node (127.0.0.1), 8 processes each, rendezvous 127.0.0.1:29511"
    assert lines[2] == (
        f"srun --nodes 1 --ntasks-per-node 1 --kill-on-bad-exit=1 --output runs/x/logs/%j-node%n.log bash -c "
        f"bash {LAUNCH}/torchrun.sh --nproc 8 configs/tiny-cpu.yaml {data} "
        f"--set train.save_dir=runs/x/checkpoints --set train.load=auto ")
    # the config is validated for nodes x processes before srun starts anything
    proc = _bash("slurm.sbatch", "--dry-run", "configs/tiny-cpu.yaml", data, "--set", "train.micro_batch_size=3",
                 env=env)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.strip() == (
        "megalong: config error: train.global_batch_size: 64 is not a multiple of train.micro_batch_size x "
        "data-parallel size = 3 x 16")


def test_deepspeed_launcher_dry_run_and_validation(tiny_data, tmp_path):
    data = _data_config(tiny_data, tmp_path)
    proc = _bash("deepspeed.sh", "--hostfile", "launch/hostfile.example", "--zero-stage", "3", "--dry-run",
                 "configs/tiny-cpu.yaml", data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        "deepspeed --hostfile launch/hostfile.example --master_addr node001 --master_port 29500 --no_local_rank "
        f"--module megalong.cli train configs/tiny-cpu.yaml {data} --set deepspeed.zero_stage=3 "
        "--set train.engine=deepspeed")
    proc = _bash("deepspeed.sh", "--num-gpus", "2", "--master-port", "29600", "--dry-run", "configs/tiny-cpu.yaml", data)
    assert proc.stdout.strip() == ("deepspeed --num_gpus 2 --master_port 29600 --no_local_rank --module "
                                   f"megalong.cli train configs/tiny-cpu.yaml {data} --set train.engine=deepspeed")
    # validated for the 16 slots of the hostfile, with the engine the launcher sets
    proc = _bash("deepspeed.sh", "--hostfile", "launch/hostfile.example", "--dry-run", "configs/tiny-cpu.yaml", data,
                 "--set", "train.global_batch_size=48")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "megalong: config error: train.global_batch_size: 48 is not a multiple of train.micro_batch_size x "
        "data-parallel size = 2 x 16")
    bad = tmp_path / "hosts"
    bad.write_text("# comment\nnode1 slots=4\nnode2 slots=four\n")
    for args, message in [
        (["--hostfile", str(bad)], f"{bad}:3: expected 'hostname slots=N', got 'node2 slots=four'"),
        (["--hostfile", "nowhere"], "hostfile not found: nowhere"),
        (["--hostfile", "launch/hostfile.example", "--num-gpus", "2"], "--num-gpus and --hostfile exclude"),
        (["--zero-stage", "4"], "--zero-stage must be 1, 2 or 3, got '4'"),
        (["--num-gpus", "-1"], "--num-gpus must be a positive integer"),
        (["--master-port", "99999"], "--master-port must be 1..65535"),
    ]:
        proc = _bash("deepspeed.sh", *args, "--dry-run", "configs/tiny-cpu.yaml")
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)


def _wait_for_checkpoint(save_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while find_latest(save_dir) is None or ckpt.read_checkpoint_info(save_dir).meta["step"] < step:
        assert proc.poll() is None, f"the run ended before its step {step} checkpoint:\n{proc.communicate()}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _assert_resumed_the_same_curve(save_dir: Path, steps: int) -> None:
    """metrics.jsonl holds both attempts: every step up to the end, and the steps run twice (after
    the checkpoint, before the interruption) with the same loss both times."""
    seen: dict[int, list[float]] = {}
    for line in (save_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            seen.setdefault(record["step"], []).append(record["train/loss"])
    assert sorted(seen) == list(range(1, steps + 1))
    for step, losses in seen.items():
        assert max(losses) - min(losses) < 1e-6, (step, losses)
    info = ckpt.read_checkpoint_info(save_dir)
    assert info.meta["step"] == steps and info.meta["data_parallel"] == 2


STEPS = 40
RUN = {"train.save_interval": 2, "train.eval_iters": 1}


def test_slurm_two_nodes_preempted_requeued_and_resumed(tiny_data, tmp_path):
    env = {**os.environ, **_slurm_env(tmp_path)}
    args = tiny_overrides(tiny_data, tmp_path / "ignored", STEPS, **RUN)  # the script sets save_dir
    save_dir = tmp_path / "run" / "checkpoints"
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(save_dir, job, 2)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends before preempting (--signal=B:USR1@120)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, out + err
    assert "USR1 received: requeueing job 77" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
    assert ckpt.read_checkpoint_info(save_dir).meta["step"] < STEPS  # it was stopped early

    # Slurm starts the requeued job: the same script, which resumes from the newest checkpoint.
    rerun = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log")}
    assert rerun.returncode == 0, (rerun.stdout, rerun.stderr, logs)
    assert sorted(logs) == ["77-node0.log", "77-node1.log"]
    assert "resumed from" in logs["77-node0.log"]
    _assert_resumed_the_same_curve(save_dir, STEPS)


def test_slurm_one_node_job_runs(tiny_data, tmp_path):
    """`sbatch --nodes 1`: one torchrun, standalone (torchrun.sh refuses a rendezvous endpoint
    with one node), trains and saves."""
    env = {**os.environ, **_slurm_env(tmp_path, SLURM_NNODES="1", SLURM_JOB_NODELIST="node1",
                                      FAKE_SLURM_HOSTS="127.0.0.1")}
    args = tiny_overrides(tiny_data, tmp_path / "ignored", 3, **{"train.eval_iters": 1})
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log")}
    assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)
    assert sorted(logs) == ["77-node0.log"] and "--standalone" in logs["77-node0.log"]
    info = ckpt.read_checkpoint_info(tmp_path / "run" / "checkpoints")
    assert info.meta["step"] == 3 and info.meta["world_size"] == 1


def _worker_pid(tag: str, rank: int) -> int | None:
    """The training process with RANK=rank among those started with MEGALONG_TEST_TAG=tag."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (f"MEGALONG_TEST_TAG={tag}".encode() in environ and f"RANK={rank}".encode() in environ
                and b"megalong.cli" in cmdline and b"torch.distributed.run" not in cmdline):
            return int(entry.name)
    return None


def test_rank_killed_mid_run_resumes_from_last_checkpoint(tiny_data, tmp_path):
    """SIGKILL rank 1 of 2 after a checkpoint: the job fails, its last complete checkpoint loads,
    and the job started again (train.load: auto) resumes from it and finishes the same loss curve."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MEGALONG_TEST_TAG": tag}
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), "--nproc", "2",
           *tiny_overrides(tiny_data, tmp_path, STEPS, **RUN, **{"train.load": "auto"})]
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(tmp_path, job, 4)
    pid = _worker_pid(tag, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    out, err = job.communicate(timeout=300)
    assert job.returncode != 0, "the job went on without rank 1"
    last = ckpt.read_checkpoint_info(tmp_path)
    assert 4 <= last.meta["step"] < STEPS
    assert not list(tmp_path.glob(f"step_*/{META}.tmp"))

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert f"resumed from {last.path} at step {last.meta['step']}" in again.stdout
    _assert_resumed_the_same_curve(tmp_path, STEPS)
