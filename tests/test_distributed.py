"""Data-parallel pretraining on the CPU with the gloo backend, and how training processes pick devices.

Two processes stand in for two GPUs: the DDP gradient must equal the single-process gradient of the
same global batch, and `python -m ssl_pipeline pretrain` with two processes must train and write a
checkpoint that loads.
"""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_pipeline.core import distributed, multinode
from ssl_pipeline.core.models import build_encoder
from ssl_pipeline.objectives import build_objective
from ssl_pipeline.stages.preprocess import preprocess
from ssl_pipeline.stages.pretrain import pretrain
from ssl_pipeline.core.runtime import (FAIL_ONCE, claim_free_gpu, fail_once_if_asked, release_gpus,
                                  select_device)
from ssl_pipeline.core.training import load_checkpoint
from tests.conftest import REPO, needs_no_cuda, write_synthetic_idx

MODEL = {"widths": [8, 16], "convs_per_stage": 1, "pool_size": 2}
from tests.test_objectives import SETTINGS as OBJECTIVE_SETTINGS

SIMCLR = OBJECTIVE_SETTINGS["simclr"]
PRETRAIN = {
    "objective": "simclr", "epochs": 6, "batch_size": 64, "learning_rate": 0.003, "weight_decay": 0.0,
    "warmup_epochs": 0, "seed": 0, "processes": 2, "simclr": SIMCLR,
    "augment": {"crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 1.3333], "flip": True,
                "brightness_contrast": 0.2, "erase_probability": 0.0},
}
COMPUTE = {"device": "auto", "require_gpu": False, "precision": "fp32"}


# ---- sharding and launching ----------------------------------------------------------------------

def test_shards_are_disjoint_equal_and_cover_every_class_of_a_sorted_file():
    labels = torch.arange(3).repeat_interleave(7)  # sorted by class, 21 items
    shards = [distributed.shard(labels, distributed.Ranks(rank, 2)) for rank in range(2)]
    assert [len(s) for s in shards] == [10, 10]
    indices = [distributed.shard(torch.arange(21), distributed.Ranks(rank, 2)) for rank in range(2)]
    assert not set(indices[0].tolist()) & set(indices[1].tolist())
    assert all(set(s.tolist()) == {0, 1, 2} for s in shards)
    whole = distributed.shard(labels, distributed.Ranks())
    assert torch.equal(whole, labels)


def test_processes_follow_the_gpus_of_the_job_unless_config_names_a_count():
    assert distributed.processes_for("auto", 0) == 1
    assert distributed.processes_for("auto", 1) == 1
    assert distributed.processes_for("auto", 4) == 4
    assert distributed.processes_for(2, 0) == 2


def test_torchrun_runs_the_same_command_once_per_process():
    command = distributed.torchrun_command(4, ["pretrain", "--threads", "8"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in command and "--standalone" in command
    assert command[-5:] == ["-m", "ssl_pipeline", "pretrain", "--threads", "8"]


def test_several_nodes_run_one_srun_task_per_process_that_ends_the_step_when_one_dies():
    command = multinode.srun_command("srun", 4, 8, 6, ["pretrain", "--threads", "48"])
    assert command[:7] == ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--cpus-per-task=6",
                           "--kill-on-bad-exit=1", "--distribution=block"]
    assert command[7:] == [sys.executable, "-m", "ssl_pipeline", "pretrain", "--threads", "48"]


def test_the_lost_rank_is_the_first_task_srun_saw_end():
    killed = ["srun: error: n2: task 1: Killed", "srun: launch/slurm: _step_signal: Terminating StepId=3.0",
              "srun: error: n1: task 0: Exited with exit code 1"]
    assert multinode.lost_rank(killed, "gloo: Connection reset by peer") == "rank 1 on node n2 was lost (Killed)"
    failed = ["srun: error: n1: task 0: Exited with exit code 1", "srun: error: n2: task 1: Killed"]
    assert multinode.lost_rank(failed, "pretrain: failure injected") == \
        "rank 0 on node n1 failed (Exited with exit code 1): pretrain: failure injected"
    assert multinode.lost_rank([], "out of memory") == "out of memory"


def test_several_nodes_outside_slurm_are_an_error_naming_the_key(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    multinode.check_nodes(1)
    with pytest.raises(ValueError, match=r"config key compute.nodes is 2, but this job does not run under Slurm"):
        multinode.check_nodes(2)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    multinode.check_nodes(2)


def test_a_slurm_task_gets_the_variables_torchrun_would_set(monkeypatch):
    for name, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "4",
                        multinode.RENDEZVOUS: "node7:41234"}.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "unset")  # so that monkeypatch removes what the call sets
        monkeypatch.delenv(name)
    assert multinode.under_srun_launcher()
    multinode.slurm_task_environment()
    assert distributed.launched_ranks() == distributed.Ranks(5, 8)
    assert distributed.Ranks(5, 8).per_node == 2
    assert (os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("1", "node7", "41234")


# ---- the gradient of each objective under DDP -----------------------------------------------------

def without_batch_statistics(objective):
    """BatchNorm on running statistics (a rank's batch statistics differ from the global batch's), the
    rest in training mode, so that MoCo still fills its queue."""
    for module in objective.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return objective


def objective_for_gradient_test(name):
    torch.manual_seed(0)
    encoder = build_encoder(MODEL, 1)
    return without_batch_statistics(build_objective(name, encoder, OBJECTIVE_SETTINGS[name]))


def ddp_gradients(rank, world_size, init_file, name, features, views, out_dir):
    """One rank: its shard of both views' features and images through a DDP-wrapped objective; saves
    its loss, the averaged grads and the objective's buffers (MoCo's queue)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    objective = objective_for_gradient_test(name)
    parallel = distributed.data_parallel(objective, distributed.Ranks(rank, world_size), torch.device("cpu"))
    own = torch.cat([view[rank::world_size] for view in features])  # (2B / W, F), first views first
    own_views = torch.cat([view[rank::world_size] for view in views])
    loss, _ = parallel(own, own_views, None)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in objective.named_parameters()},
                "buffers": dict(objective.named_buffers())}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(OBJECTIVE_SETTINGS))
def test_ddp_gradient_of_each_objective_equals_the_single_process_gradient(tmp_path, name):
    """SimCLR, VICReg and Barlow Twins compute their loss over all ranks' embeddings (the all-gather's
    backward sums over the ranks, DDP averages); BYOL and MoCo average per-image losses, and MoCo's
    queue receives every rank's keys. Either way the gradient must equal that of one process on the
    whole batch, and MoCo's queue must be the same."""
    world_size, batch = 2, 8
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, batch, 64, generator=generator)  # (views, B, F): the encoder's 16 x 2 x 2
    views = torch.rand(2, batch, 1, 12, 12, generator=generator)
    mp.spawn(ddp_gradients, args=(world_size, tmp_path / "init", name, features, views, tmp_path),
             nprocs=world_size)

    reference = objective_for_gradient_test(name)
    # The gather puts rank 0's rows first: the same global batch, in that order.
    order = torch.cat([torch.arange(batch)[rank::world_size] for rank in range(world_size)])
    loss, _ = reference(torch.cat([view[order] for view in features]), torch.cat([view[order] for view in views]))
    loss.backward()
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    torch.testing.assert_close(sum(r["loss"] for r in results) / world_size, loss.detach())
    trained = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    # Float rounding differs with the order of the sums; some gradients are 0 up to that rounding (a
    # bias before a batch standardisation), so the tolerance follows the largest gradient.
    scale = max(grad.abs().max().item() for grad in trained.values())
    for result in results:
        for parameter_name, grad in trained.items():
            torch.testing.assert_close(result["grads"][parameter_name], grad, rtol=1e-5, atol=1e-6 * scale)
        for buffer_name, buffer in reference.named_buffers():
            torch.testing.assert_close(result["buffers"][buffer_name], buffer)


ENCODERS = {"cnn": (MODEL, 1), "resnet18": ({"architecture": "resnet18", "small_images": True}, 3)}


def encoder_for_gradient_test(backbone):
    torch.manual_seed(0)
    settings, channels = ENCODERS[backbone]
    return without_batch_statistics(build_encoder(settings, channels).to(memory_format=torch.channels_last))


def ddp_encoder_gradients(rank, world_size, init_file, backbone, images, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    encoder = encoder_for_gradient_test(backbone)
    parallel = distributed.data_parallel(encoder, distributed.Ranks(rank, world_size), torch.device("cpu"))
    # The mean over the global batch: each rank's mean over its half, which DDP's gradient averaging halves.
    parallel(images[rank::world_size]).square().mean().backward()
    torch.save({n: p.grad for n, p in encoder.named_parameters()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("backbone", sorted(ENCODERS))
def test_ddp_gradient_of_each_backbone_equals_the_single_process_gradient(tmp_path, backbone):
    """Every backbone trains data-parallel (in channels_last): the averaged gradient of two ranks equals
    one process's on the whole batch."""
    settings, channels = ENCODERS[backbone]
    images = torch.rand(8, channels, 12, 12, generator=torch.Generator().manual_seed(1))
    mp.spawn(ddp_encoder_gradients, args=(2, tmp_path / "init", backbone, images, tmp_path), nprocs=2)
    reference = encoder_for_gradient_test(backbone)
    order = torch.cat([torch.arange(8)[rank::2] for rank in range(2)])
    reference(images[order]).square().mean().backward()
    scale = max(p.grad.abs().max().item() for p in reference.parameters())
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-5 * scale)


# ---- two-process pretraining through the command line --------------------------------------------

@pytest.fixture(scope="module")
def unlabeled_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    files = write_synthetic_idx(root / "raw", num_classes=3, size=12, train_per_class=80, compress=False)
    preprocess({role: root / "raw" / spec["name"] for role, spec in files.items()}, root / "data",
               "synthetic", 0.25, split_seed=0)
    return root / "data"


def pretrain_command(data_dir, out_dir, settings, threads=2, gpus=0, checkpoint_every=5.0) -> list:
    """`python -m ssl_pipeline pretrain` as the rule calls it, with outputs and resume file in out_dir."""
    return [sys.executable, "-m", "ssl_pipeline", "pretrain",
            "--train-images", str(data_dir / "train_images.npy"),
            "--normalization", str(data_dir / "normalization.json"),
            "--settings", json.dumps({"pretrain": settings, "model": MODEL, "compute": COMPUTE}),
            "--threads", str(threads), "--gpus", str(gpus), "--resume-file", str(out_dir / "resume.pt"),
            "--checkpoint-every", str(checkpoint_every), "--stop-margin-seconds", "120",
            "--resume", "same_settings",
            "--checkpoint", str(out_dir / "encoder.pt"), "--curve", str(out_dir / "curve.csv")]


def command_env(env=None) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    return environment


def run_pretrain_command(data_dir, out_dir, settings, threads=2, gpus=0, env=None):
    return subprocess.run(pretrain_command(data_dir, out_dir, settings, threads, gpus), cwd=out_dir,
                          env=command_env(env), capture_output=True, text=True, timeout=300)


def test_two_processes_pretrain_on_their_shards_and_rank_0_writes_a_checkpoint_that_loads(
        unlabeled_images, tmp_path):
    result = run_pretrain_command(unlabeled_images, tmp_path, PRETRAIN)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "starting 2 data-parallel processes" in log
    assert "rank 0 of 2 joined the process group (gloo)" in log
    assert "rank 1 of 2 joined the process group (gloo)" in log
    # 180 training images: a shard of 90 per rank, a global batch of 64 split into 32 per rank.
    assert "pretraining simclr on 180 images, 6 epochs of 2 steps, in 2 data-parallel process(es)" in log
    curve = (tmp_path / "curve.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[1]) for line in curve]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2
    checkpoint = load_checkpoint(tmp_path / "encoder.pt")
    assert checkpoint["config"]["pretrain"]["processes"] == 2
    world = checkpoint["encoder_card"]["world"]  # what the report prints: both ranks, on this one host
    assert world["world_size"] == 2 and len(world["rank_nodes"]) == 2 and world["nodes"] == world["rank_nodes"][:1]
    encoder = build_encoder(MODEL, checkpoint["in_channels"])
    encoder.load_state_dict(checkpoint["encoder"])  # strict: the DDP wrapper left no prefix behind
    assert encoder(torch.zeros(2, 1, 12, 12)).shape == (2, encoder.feature_dim)


def test_the_global_batch_must_split_evenly_over_the_processes(unlabeled_images, tmp_path, monkeypatch):
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}.items():  # as torchrun sets
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"pretrain.batch_size \(63\) must be divisible by the 2 data-parallel"):
        pretrain(unlabeled_images / "train_images.npy", unlabeled_images / "normalization.json",
                 tmp_path / "encoder.pt", tmp_path / "curve.csv", {**PRETRAIN, "batch_size": 63}, MODEL,
                 {**COMPUTE, "threads": 1})


# ---- devices a scheduler hands out ---------------------------------------------------------------

@needs_no_cuda
@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_a_gpu_granted_by_the_scheduler_but_unusable_is_a_clear_warning_and_the_cpu(caplog, monkeypatch,
                                                                                    requested):
    """Slurm's --gpus=1 sets CUDA_VISIBLE_DEVICES; with config device auto that counts as asking."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with caplog.at_level(logging.WARNING):
        assert select_device(requested, require_gpu=False) == torch.device("cpu")
    assert "CUDA_VISIBLE_DEVICES='0' but torch finds no usable CUDA device; falling back to the CPU" in caplog.text


@needs_no_cuda
@pytest.mark.parametrize("visible", [None, "", "-1"])
def test_no_gpu_asked_for_means_the_cpu_without_a_warning(caplog, monkeypatch, visible):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with caplog.at_level(logging.WARNING):
        assert select_device("auto", require_gpu=False) == torch.device("cpu")
    assert caplog.text == ""


def test_each_process_claims_a_gpu_no_other_holds(tmp_path):
    gpus = ["GPU-a", "GPU-b"]
    try:
        assert claim_free_gpu(gpus, tmp_path) == 0
        # Another process: the lock of GPU-a is held, so it gets GPU-b, then nothing.
        claim = [sys.executable, "-c", "from ssl_pipeline.core.runtime import claim_free_gpu; "
                 f"print(claim_free_gpu({gpus!r}, {str(tmp_path)!r}))"]
        other = subprocess.run(claim, cwd=REPO, capture_output=True, text=True, check=True)
        assert other.stdout.strip() == "1"  # its lock went with it when it exited
        assert claim_free_gpu(gpus, tmp_path) == 1
        assert claim_free_gpu(gpus, tmp_path) is None
    finally:
        release_gpus()
    assert claim_free_gpu(gpus, tmp_path) == 0
    release_gpus()


def test_the_failure_switch_fails_the_first_attempt_only(tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_ONCE, str(tmp_path / "failed-once"))
    with pytest.raises(RuntimeError, match="failure injected by the test switch SSL_PIPELINE_FAIL_ONCE"):
        fail_once_if_asked("pretrain")
    fail_once_if_asked("pretrain")
    monkeypatch.delenv(FAIL_ONCE)
    fail_once_if_asked("pretrain")
