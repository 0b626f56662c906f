"""The CUDA path, on an NVIDIA GPU: bf16 autocast and channels_last on every backbone, the compiled step,
no host-device sync inside a pretraining step, an exact resume, NCCL and SyncBatchNorm, and the peak
memory of a step (results/performance/gpu-memory.json).

Every test is marked gpu: without CUDA they skip, and inside the GPU check (make gpu-check, which sets
SSL_PIPELINE_GPU_CHECK=1) they fail instead (tests/conftest.py). Step counts are small: the file runs
in well under 2 minutes on one GPU, most of it compiling.
"""
import copy
import gc
import logging
import signal
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_pipeline import benchmark

from ssl_pipeline.core import distributed
from ssl_pipeline.core.artifacts import write_json
from ssl_pipeline.augment import color_jitter
from ssl_pipeline.backbones import BACKBONES
from ssl_pipeline.core.data import BatchOrder, device_generator
from ssl_pipeline.core.residency import ImageData
from ssl_pipeline.core.models import build_encoder, prepare
from ssl_pipeline.objectives import OBJECTIVES
from ssl_pipeline.objectives.common import all_gather_rows
from ssl_pipeline.stages.pretrain import pretrain
from ssl_pipeline.core.resume import Checkpointer, TrainingStopped, note_sigterm
from ssl_pipeline.core.runtime import setup_runtime
from ssl_pipeline.core.training import load_checkpoint
from tests.conftest import REPO
from tests.test_objectives import SETTINGS as OBJECTIVE_SETTINGS
from tests.test_resume import assert_same_losses, assert_same_weights, read_curve, resume_at
from tests.test_training import MODEL, PRETRAIN, data_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.gpu

# What a job with config compute.device cuda runs with: precision auto is bf16 autocast on GPUs that have it.
CUDA = {"device": "cuda", "require_gpu": True, "precision": "auto", "threads": 4, "compile": False}


def cuda_runtime(**compute):
    """setup_runtime as a training job calls it on the GPU (cuDNN autotuning on, seed 0)."""
    return setup_runtime({**CUDA, **compute}, seed=0)


def random_split(count: int, image_shape) -> benchmark.Split:
    """uint8 images (count, C, H, W) of a dataset's shape (C, H, W), without the dataset."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, *image_shape), dtype=np.uint8)
    return benchmark.Split(images, np.zeros(count, dtype=np.int64))


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """L2 norm of the difference over the L2 norm of the reference, both in fp32."""
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def without_syncs(function, calls: int) -> None:
    """Call function() `calls` times with every host-device synchronisation an error."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(calls):
            function()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------------------------------------------
# bf16 autocast and channels_last on every backbone
# ---------------------------------------------------------------------------------------------------

# Model settings and image side of each backbone: the default config's CNN, ResNet-18 as the CIFAR
# experiments build it (small-image stem), ResNet-50 with the ImageNet stem (7x7 stride 2, max-pool).
BACKBONE_CASES = {
    "cnn": ({"architecture": "cnn", "widths": [32, 64, 128], "convs_per_stage": 2, "pool_size": 2}, 28),
    "resnet18": ({"architecture": "resnet18", "small_images": True}, 32),
    "resnet50": ({"architecture": "resnet50", "small_images": False}, 64),
}
BF16_FEATURE_ERROR = 0.05


@pytest.mark.parametrize("architecture", sorted(BACKBONES))
def test_every_backbone_trains_in_bf16_autocast_and_channels_last_close_to_fp32(architecture):
    """As pretraining runs an encoder on CUDA: prepared in channels_last (models.prepare), fed
    channels_last views (data.Normalizer), forward under the runtime's autocast, which precision auto
    makes bf16 here. bf16 keeps 8 significant bits (0.4 % rounding per operation); over up to 50
    layers the features drift 1 to 2 % from an fp32 forward of the same weights, so they must agree
    within 5 % (relative L2 over the batch), where a wrong memory format or a broken kernel is off by
    order 100 %. That comparison is in eval mode (BatchNorm on its running statistics): in train mode
    a freshly initialised ResNet-50 is so ill-conditioned that rounding only its input to bf16 moves
    its fp32 features by 20 % (measured on the CPU), which would hide the kernels' error. The fp32
    forward is PyTorch's default (cuDNN may use TF32 for convolutions, an error of 0.1 %). A train-mode
    forward and backward, as in training, must give finite features and gradients, not all zero. A
    backbone added to the registry without a case here fails."""
    settings, side = BACKBONE_CASES[architecture]
    runtime = cuda_runtime()
    assert runtime.autocast_dtype == torch.bfloat16
    torch.manual_seed(0)
    encoder = prepare(build_encoder(settings, 3), runtime.device)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in encoder.parameters() if p.dim() == 4)
    images = torch.rand(16, 3, side, side, device=runtime.device).contiguous(memory_format=torch.channels_last)
    encoder.eval()
    with torch.no_grad():
        reference = encoder(images)  # fp32
        with runtime.autocast():
            features = encoder(images)
    assert features.dtype == torch.bfloat16 and features.shape == (16, encoder.feature_dim)
    assert relative_error(features, reference) < BF16_FEATURE_ERROR

    encoder.train()
    with runtime.autocast():
        features = encoder(images)
    assert features.dtype == torch.bfloat16 and torch.isfinite(features).all()
    features.float().square().mean().backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().max() > 0 for grad in grads)


# ---------------------------------------------------------------------------------------------------
# The compiled step
# ---------------------------------------------------------------------------------------------------

def test_compiled_pretraining_on_cuda_agrees_with_eager(data_dir, tmp_path, caplog):  # noqa: F811
    """compute.compile on CUDA as a job runs it: pretrain() compiles the encoder and the objective in
    place (runtime.compile_modules, after the data-parallel wrap), under bf16 autocast. Each epoch's
    loss and embedding spread agree with eager training within 1 % (relative), not the 0.1 % of fp32
    on the CPU (tests/test_training.py): inductor fuses bf16 operations and rounds once where eager
    rounds after each, a difference of bf16's rounding (0.4 %) in every activation, which 4 AdamW
    steps carry forward."""
    curves = {}
    caplog.set_level(logging.INFO)
    for compile in (False, True):
        pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", tmp_path / f"{compile}.pt",
                 tmp_path / f"{compile}.csv", {**PRETRAIN, "epochs": 2}, MODEL, {**CUDA, "compile": compile})
        curves[compile] = read_curve(tmp_path / f"{compile}.csv")
    assert len(curves[True]) == len(curves[False]) == 2
    for eager, compiled in zip(curves[False], curves[True]):
        for column in ("loss", "embedding_std"):
            assert float(compiled[column]) == pytest.approx(float(eager[column]), rel=1e-2), column
    compiled_runs = [record for record in caplog.records
                     if record.name == "ssl_pipeline.core.runtime" and "torch.compile" in record.getMessage()]
    assert len(compiled_runs) == 1 and "cuda" in compiled_runs[0].getMessage()


# ---------------------------------------------------------------------------------------------------
# No host-device sync inside a pretraining step
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_a_pretraining_step_never_waits_for_the_gpu(objective, channels):
    """The step of pretrain()'s loop as the speed benchmark builds it from the default config
    (benchmark.build_trainer "ours": the batch cut from uint8 images on the device, two augmented
    views, forward under bf16 autocast, backward, AdamW, the momentum targets' update), for every
    objective. After a warm-up step (cuDNN autotuning, the allocator's first blocks, AdamW's state),
    3 steps run with torch.cuda.set_sync_debug_mode("error"): anything that makes the host wait for
    the GPU raises. Colour images (3 channels) also run the colour jitter and random grayscale."""
    runtime = cuda_runtime()
    config = benchmark.load_config()
    config["pretrain"]["objective"] = objective
    split = random_split(256, (1, 28, 28) if channels == 1 else (3, 32, 32))
    trainer = benchmark.build_trainer("pretrain", "ours", config, split, runtime, batch_size=64)
    trainer.step()
    torch.cuda.synchronize(runtime.device)
    without_syncs(trainer.step, 3)
    assert all(torch.isfinite(p).all() for module in trainer.modules for p in module.parameters())


def test_host_and_disk_batches_copied_on_a_side_stream_equal_the_devices_while_the_gpu_is_busy(tmp_path):
    """data.residency host and disk on CUDA: the prefetching thread copies each batch on a stream of its
    own, and the training stream waits for that copy on the device. With the training stream kept busy
    between batches, every batch and every evaluation chunk must still hold the device residency's bytes."""
    images = np.random.default_rng(0).integers(0, 256, (96, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "train_images.npy", images)
    expected = torch.from_numpy(images).cuda()
    busy = torch.randn(2048, 2048, device="cuda")
    seen = {}
    for residency in ("device", "host", "disk"):
        data = ImageData([tmp_path / "train_images.npy"], residency, "cuda")
        assert (data.copy_stream is None) == (residency == "device")
        generator = device_generator(torch.device("cuda"), 5)
        order = BatchOrder(len(data), 16, generator, "cuda")
        batches = data.batches(order)
        seen[residency] = []
        for _ in range(2 * order.steps_per_epoch + 1):
            index, batch = batches.next()
            for _ in range(3):  # the step's kernels, queued on the training stream
                busy = torch.tanh(busy @ busy)
            assert torch.equal(batch, expected[index]), residency
            seen[residency].append(index.clone())
        batches.close()
        assert torch.equal(torch.cat(list(data.chunks(40))), expected), residency
        data.finish()
    for residency in ("host", "disk"):
        assert all(torch.equal(a, b) for a, b in zip(seen[residency], seen["device"]))


def test_the_colour_jitter_selects_on_the_device_without_a_sync_and_as_the_ordered_one_does():
    """color_jitter on CUDA keeps its drawn order on the device. Following the order on the host
    (order_on_device=False: what it did before) reads it back, a sync the guard catches, which also
    shows the guard works; the selection on the device needs none and gives the same images bit for
    bit from the same generator state."""
    device = cuda_runtime().device
    settings = benchmark.load_config()["pretrain"]["augment"]["color_jitter"]
    images = torch.rand(64, 3, 32, 32, device=device)
    ordered = color_jitter(images, settings, device_generator(device, 7), order_on_device=False)
    generator = device_generator(device, 7)
    with pytest.raises(RuntimeError, match="synchroniz"):
        without_syncs(lambda: color_jitter(images, settings, generator, order_on_device=False), 1)
    generator, selected = device_generator(device, 7), []
    without_syncs(lambda: selected.append(color_jitter(images, settings, generator)), 1)
    assert torch.equal(selected[0], ordered)
    assert not torch.equal(selected[0], images)


# ---------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------

def stop_after_step(monkeypatch, stop_step: int) -> None:
    """Training notes a SIGTERM (the resume module's own handler) just before the end of step
    `stop_step`, and so stops there: a known step, whatever the GPU's speed, and no real signal."""
    after_step = Checkpointer.after_step

    def noting(self, step, loss, snapshot):
        if step == stop_step:
            note_sigterm(signal.SIGTERM, None)
        return after_step(self, step, loss, snapshot)

    monkeypatch.setattr(Checkpointer, "after_step", noting)


@pytest.mark.parametrize("objective", ["simclr", "moco_v2"])
def test_a_run_stopped_and_resumed_on_cuda_ends_with_the_weights_of_an_uninterrupted_one(
        data_dir, tmp_path, monkeypatch, caplog, objective):  # noqa: F811
    """As on the CPU (tests/test_resume.py), bit for bit: stopped mid-epoch (step 51 of 100) and run
    again, pretraining ends with the weights and curve of an uninterrupted run; for MoCo the key
    encoder and the queue too, and its key shuffle draws from the device generator. Bit for bit needs
    deterministic kernels. The project's CUDA runtime autotunes cuDNN (cudnn.benchmark), which may
    pick a convolution algorithm that sums with atomics; cudnn.deterministic, set here, limits it to
    deterministic ones. The rest of this step is deterministic on one GPU (cuBLAS on one stream,
    BatchNorm, pooling over windows that do not overlap, the augmentations), and the resume file holds
    the CUDA RNG states. torch.use_deterministic_algorithms is not set: it rejects adaptive average
    pooling's CUDA backward outright, although with windows that do not overlap it sums nothing twice.
    Eager (compute.compile false): the compiled step has its own test."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    settings = {**PRETRAIN, "epochs": 50, "objective": objective, objective: OBJECTIVE_SETTINGS[objective]}
    runs = {}
    for name in ("whole", "stopped"):
        (tmp_path / name).mkdir()
        runs[name] = (data_dir / "train_images.npy", data_dir / "normalization.json",
                      tmp_path / name / "encoder.pt", tmp_path / name / "curve.csv")
    pretrain(*runs["whole"], settings, MODEL, CUDA, resume_at(tmp_path / "whole" / "resume.pt", every=60))
    stopped = resume_at(tmp_path / "stopped" / "resume.pt", every=60)
    with monkeypatch.context() as stopping:
        stop_after_step(stopping, 51)
        with pytest.raises(TrainingStopped, match=rf"pretrain {objective} stopped by SIGTERM at epoch 26, step 1 of 2"):
            pretrain(*runs["stopped"], settings, MODEL, CUDA, stopped)
    with caplog.at_level(logging.INFO):
        pretrain(*runs["stopped"], settings, MODEL, CUDA, stopped)
    assert "resuming from" in caplog.text and "after epoch 26, step 1 of 2" in caplog.text
    ours, theirs = (load_checkpoint(tmp_path / name / "encoder.pt") for name in ("stopped", "whole"))
    assert_same_weights(ours["encoder"], theirs["encoder"], "encoder")
    assert_same_weights(ours["objective_head"], theirs["objective_head"], "objective")
    assert_same_losses(read_curve(tmp_path / "stopped" / "curve.csv"), read_curve(tmp_path / "whole" / "curve.csv"),
                       "loss")


# ---------------------------------------------------------------------------------------------------
# NCCL and SyncBatchNorm
# ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_nccl_joins_one_rank_and_sync_batchnorm_trains_under_ddp():
    """What gloo on the CPU (tests/test_distributed.py) cannot show: an NCCL process group (one rank,
    on loopback) whose all_reduce and all_gather (objectives.common.all_gather_rows) run on CUDA
    tensors, and distributed.data_parallel's SyncBatchNorm conversion of a backbone: every BatchNorm
    becomes a SyncBatchNorm in place (the state_dict keys stay, so a checkpoint loads into a plain
    encoder), and under DDP over NCCL a train-mode forward and backward gives the gradient of the
    plain encoder (one rank averages one gradient). data_parallel converts only when there are
    several ranks, so it is told of two; the process group it then uses, the default one, has one."""
    device = cuda_runtime().device
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
        total = torch.arange(4.0, device=device)
        dist.all_reduce(total)
        assert torch.equal(total, torch.arange(4.0, device=device))  # the sum over one rank
        rows = torch.randn(3, 5, device=device)
        assert torch.equal(all_gather_rows(rows), rows)

        torch.manual_seed(0)
        plain = prepare(build_encoder({"architecture": "resnet18", "small_images": True}, 3), device).train()
        encoder = copy.deepcopy(plain)
        parallel = distributed.data_parallel(encoder, distributed.Ranks(0, 2), device)
        assert isinstance(parallel, DistributedDataParallel)
        norms = [module for module in encoder.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 20 and all(isinstance(module, nn.SyncBatchNorm) for module in norms)
        assert list(encoder.state_dict()) == list(plain.state_dict())
        images = torch.rand(8, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        parallel(images).square().mean().backward()
        plain(images).square().mean().backward()
        # cuDNN may sum in another order from one backward to the next: the tolerance follows the largest gradient.
        scale = max(p.grad.abs().max().item() for p in plain.parameters())
        for (name, ours), theirs in zip(encoder.named_parameters(), plain.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# Peak memory of a step
# ---------------------------------------------------------------------------------------------------

MEMORY_FIGURES = REPO / "results" / "performance" / "gpu-memory.json"
# A pretraining step of either config must fit in this share of the GPU's memory.
MEMORY_SHARE = 0.25
MIB = 2 ** 20


def step_memory(config: dict, split: benchmark.Split, runtime) -> dict:
    """Allocated CUDA memory around one pretraining step of `config` (after a warm-up step): resident
    before it (model, optimizer state, dataset, gradients) and the peak during it."""
    trainer = benchmark.build_trainer("pretrain", "ours", config, split, runtime)
    trainer.step()
    torch.cuda.synchronize(runtime.device)
    resident = torch.cuda.memory_allocated(runtime.device)
    torch.cuda.reset_peak_memory_stats(runtime.device)
    trainer.step()
    torch.cuda.synchronize(runtime.device)
    peak = torch.cuda.max_memory_allocated(runtime.device)
    return {"architecture": config["model"]["architecture"], "objective": benchmark.pretraining_objective(config),
            "batch_size": trainer.batch_size, "image_shape": list(split.images.shape[1:]),
            "autocast": str(runtime.autocast_dtype).replace("torch.", ""),
            "resident_mib": round(resident / MIB, 1), "peak_mib": round(peak / MIB, 1)}


def test_peak_memory_of_a_default_and_a_cifar10_pretraining_step():
    """One pretraining step of the default config (the CNN on 1x28x28 Fashion-MNIST-shaped images) and
    of config/experiments/cifar10.yaml (ResNet-18, small-image stem, on 3x32x32 images), each at its
    config's batch size, on random uint8 images: torch.cuda.max_memory_allocated, written to
    results/performance/gpu-memory.json. Each step must allocate beyond what stays resident, and peak
    below a quarter of the GPU's memory; the ResNet-18's above the CNN's."""
    runtime = cuda_runtime()
    total = torch.cuda.get_device_properties(runtime.device).total_memory
    cases = {"default": ([], (1, 28, 28)), "cifar10": ([REPO / "config" / "experiments" / "cifar10.yaml"], (3, 32, 32))}
    steps = {}
    for name, (overrides, shape) in cases.items():
        config = benchmark.load_config(overrides)
        steps[name] = step_memory(config, random_split(2 * config["pretrain"]["batch_size"], shape), runtime)
        gc.collect()
        torch.cuda.empty_cache()
    write_json(MEMORY_FIGURES, {
        "command": "python -m pytest tests/test_gpu.py -k peak_memory (part of make gpu-check)",
        "gpu": torch.cuda.get_device_name(runtime.device), "gpu_memory_mib": round(total / MIB),
        "torch": torch.__version__, "cuda": torch.version.cuda, "steps": steps})
    for name, step in steps.items():
        assert 0 < step["resident_mib"] < step["peak_mib"] < MEMORY_SHARE * total / MIB, (name, step)
    assert steps["cifar10"]["peak_mib"] > steps["default"]["peak_mib"]
