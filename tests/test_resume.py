"""Resumable training: a job stopped at any step and run again ends with exactly the weights of an
uninterrupted run. Unit tests of the resume file, in-process runs stopped by a real SIGTERM, and real
processes killed with SIGKILL: alone, under Snakemake and as two data-parallel ranks."""
import csv
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from ssl_pipeline.core.data import BatchOrder, shuffled_batches
from ssl_pipeline.stages.finetune import finetune
from ssl_pipeline.stages.pretrain import pretrain
from ssl_pipeline.core.resume import ResumeFile, TrainingStopped, note_sigterm
from ssl_pipeline.core.training import load_checkpoint
from tests.conftest import REPO, SMOKE, copy_workflow, tool_env
from tests.test_distributed import PRETRAIN as DDP_PRETRAIN
from tests.test_distributed import command_env, pretrain_command, unlabeled_images  # noqa: F401 (fixture)
from tests.test_objectives import SETTINGS as OBJECTIVE_SETTINGS
from tests.test_training import CPU, FINETUNE, MODEL, PRETRAIN, data_dir, encoder_path  # noqa: F401

LONG_PRETRAIN = {**PRETRAIN, "epochs": 200}  # 400 steps: time to stop it somewhere in the middle


def resume_at(path, every=0.0, mode="same_settings"):
    return {"path": str(path), "checkpoint_every": every, "stop_margin_seconds": 120, "mode": mode}


def read_curve(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_weights(ours: dict, theirs: dict, what=""):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{what} {key}")


def assert_same_losses(ours, theirs, column):
    assert [row[column] for row in ours] == [row[column] for row in theirs]


# ---------------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------------

def test_batch_order_gives_the_batches_of_shuffled_batches_and_continues_from_a_saved_position():
    generator = torch.Generator().manual_seed(3)
    expected = [batch for _ in range(3) for batch in shuffled_batches(50, 16, generator, "cpu")]
    order = BatchOrder(50, 16, torch.Generator().manual_seed(3), "cpu")
    assert order.steps_per_epoch == 3
    first = [order.next_batch() for _ in range(4)]  # into the second epoch
    saved, generator_state = order.state_dict(), order.generator.get_state()
    rest = [order.next_batch() for _ in range(5)]
    for ours, theirs in zip(first + rest, expected):
        assert torch.equal(ours, theirs)
    restored = BatchOrder(50, 16, torch.Generator(), "cpu")
    restored.load_state_dict(saved)
    restored.generator.set_state(generator_state)
    for ours, theirs in zip([restored.next_batch() for _ in range(5)], rest):
        assert torch.equal(ours, theirs)


WRITE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys, torch
from ssl_pipeline.core.resume import ResumeFile
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
resume_file = ResumeFile(sys.argv[1], {"stage": "pretrain"})
resume_file.save({"step": 2, "weights": torch.ones(1_000_000)})
"""


def test_a_write_that_fails_midway_leaves_the_previous_resume_file_loadable(tmp_path):
    """A real failure in the middle of the write: the process may write at most 64 KB per file
    (RLIMIT_FSIZE), so the second state, 4 MB, breaks off after 64 KB, as on a full disk."""
    resume_file = ResumeFile(tmp_path / "resume.pt", {"stage": "pretrain"})
    resume_file.save({"step": 1, "weights": torch.arange(4.0)})
    result = subprocess.run([sys.executable, "-c", WRITE_WITH_A_FILE_SIZE_LIMIT, str(resume_file.path)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "unexpected pos" in result.stderr  # torch's writer gave up midway
    state = resume_file.load()
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["resume.pt"]  # no partial file left


# ---------------------------------------------------------------------------------------------------
# Stopped and resumed in process, by a real SIGTERM
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):  # noqa: F811 (pytest fixture)
    out = tmp_path_factory.mktemp("uninterrupted")
    pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", out / "encoder.pt",
             out / "curve.csv", LONG_PRETRAIN, MODEL, CPU, resume_at(out / "resume.pt", every=60))
    return load_checkpoint(out / "encoder.pt")["encoder"], read_curve(out / "curve.csv")


def sigterm_after(seconds: float) -> threading.Timer:
    """SIGTERM to this process `seconds` after training installed its handler."""
    def send():
        while signal.getsignal(signal.SIGTERM) is not note_sigterm:
            time.sleep(0.001)
        time.sleep(seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def stopped_pretraining(data_dir, out, settings=LONG_PRETRAIN, every=60.0):  # noqa: F811
    """Pretraining stopped by SIGTERM somewhere in its first second: -> its resume file."""
    run = (data_dir / "train_images.npy", data_dir / "normalization.json", out / "encoder.pt", out / "curve.csv")
    sender = sigterm_after(random.uniform(0.0, 0.5))
    with pytest.raises(TrainingStopped, match=rf"pretrain {settings['objective']} stopped by SIGTERM at epoch \d+, "
                                              r"step \d of 2"):
        pretrain(*run, settings, MODEL, CPU, resume_at(out / "resume.pt", every))
    sender.join()
    assert not (out / "encoder.pt").exists() and (out / "resume.pt").exists()
    return run


def test_pretraining_stopped_by_sigterm_resumes_to_the_weights_of_an_uninterrupted_run(
        data_dir, uninterrupted, tmp_path, caplog):  # noqa: F811
    run = stopped_pretraining(data_dir, tmp_path)
    with caplog.at_level(logging.INFO):
        pretrain(*run, LONG_PRETRAIN, MODEL, CPU, resume_at(tmp_path / "resume.pt", every=60))
    assert f"resuming from {tmp_path / 'resume.pt'} after epoch" in caplog.text
    weights, curve = uninterrupted
    assert_same_weights(load_checkpoint(tmp_path / "encoder.pt")["encoder"], weights)
    assert_same_losses(read_curve(tmp_path / "curve.csv"), curve, "loss")
    assert not (tmp_path / "resume.pt").exists()  # deleted once the outputs are written


@pytest.mark.parametrize("objective", ["byol", "moco_v2"])
def test_momentum_targets_and_the_queue_resume_exactly(data_dir, tmp_path, objective):  # noqa: F811
    """BYOL's target network, MoCo's key encoder and queue, and the generator that shuffles MoCo's key
    batch are in the resume state: stopped by SIGTERM and resumed, the run ends with the online and
    target weights and the queue of an uninterrupted one."""
    settings = {**LONG_PRETRAIN, "objective": objective, objective: OBJECTIVE_SETTINGS[objective]}
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    for out in (whole, stopped):
        out.mkdir()
    pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", whole / "encoder.pt",
             whole / "curve.csv", settings, MODEL, CPU, resume_at(whole / "resume.pt", every=60))
    run = stopped_pretraining(data_dir, stopped, settings)
    pretrain(*run, settings, MODEL, CPU, resume_at(stopped / "resume.pt", every=60))
    ours, theirs = (load_checkpoint(out / "encoder.pt") for out in (stopped, whole))
    assert_same_weights(ours["encoder"], theirs["encoder"], "encoder")
    assert_same_weights(ours["objective_head"], theirs["objective_head"], "objective")
    momentum_state = "queue.keys" if objective == "moco_v2" else "target_encoder.features.0.0.weight"
    assert momentum_state in theirs["objective_head"]


def test_finetuning_stopped_by_sigterm_resumes_to_the_model_of_an_uninterrupted_run(
        data_dir, encoder_path, tmp_path, caplog):  # noqa: F811
    settings = {**FINETUNE, "epochs": 60}
    outputs = {name: tmp_path / name / "model.pt" for name in ("whole", "stopped")}
    run = {name: (data_dir, data_dir / "subset.npy", encoder_path, path, path.parent / "curve.csv",
                  "pretrained", 1.0, 0, settings, MODEL, CPU, resume_at(path.parent / "resume.pt"))
           for name, path in outputs.items()}
    finetune(*run["whole"])
    sender = sigterm_after(random.uniform(0.0, 0.4))
    with pytest.raises(TrainingStopped, match=r"finetune stopped by SIGTERM at step \d+ of \d+"):
        finetune(*run["stopped"])
    sender.join()
    with caplog.at_level(logging.INFO):
        finetune(*run["stopped"])
    assert "resuming from" in caplog.text
    whole, resumed = (load_checkpoint(path) for path in outputs.values())
    assert_same_weights(resumed["model"], whole["model"])
    assert resumed["best_step"] == whole["best_step"]
    assert_same_losses(read_curve(outputs["stopped"].parent / "curve.csv"),
                       read_curve(outputs["whole"].parent / "curve.csv"), "train_loss")


def damage(resume_path: Path, how: str) -> None:
    saved = torch.load(resume_path, weights_only=True)
    if how == "truncated":
        resume_path.write_bytes(resume_path.read_bytes()[:5000])
    elif how == "garbage":
        resume_path.write_bytes(b"not a resume file\n" * 100)
    elif how == "other settings":
        saved["identity"]["settings"]["pretrain"]["learning_rate"] *= 2
        torch.save(saved, resume_path)
    elif how == "other rule":
        saved["identity"]["stage"] = "finetune"
        torch.save(saved, resume_path)
    elif how == "other inputs":
        saved["identity"]["inputs"]["train_images"] = "0" * 64
        torch.save(saved, resume_path)


@pytest.mark.parametrize("how, warning", [
    ("truncated", "it cannot be read"),
    ("garbage", "it cannot be read"),
    ("other settings", "it was written with other settings or inputs (settings.pretrain.learning_rate)"),
    ("other rule", "it was written by rule finetune, not pretrain"),
    ("other inputs", "it was written with other settings or inputs (inputs.train_images)"),
])
def test_a_resume_file_that_does_not_belong_to_the_job_is_ignored_with_a_warning(
        data_dir, uninterrupted, tmp_path, caplog, how, warning):  # noqa: F811
    run = stopped_pretraining(data_dir, tmp_path)
    damage(tmp_path / "resume.pt", how)
    with caplog.at_level(logging.INFO):
        pretrain(*run, LONG_PRETRAIN, MODEL, CPU, resume_at(tmp_path / "resume.pt", every=60))
    assert f"ignoring resume file {tmp_path / 'resume.pt'}: {warning}" in caplog.text
    assert "starting afresh" in caplog.text and "resuming from" not in caplog.text
    assert_same_weights(load_checkpoint(tmp_path / "encoder.pt")["encoder"], uninterrupted[0])


def test_any_settings_continues_a_run_with_a_lower_learning_rate(data_dir, tmp_path, caplog):  # noqa: F811
    run = stopped_pretraining(data_dir, tmp_path)
    done = torch.load(tmp_path / "resume.pt", weights_only=True)["state"]["step"]
    lower = {**LONG_PRETRAIN, "learning_rate": LONG_PRETRAIN["learning_rate"] / 10}
    with caplog.at_level(logging.INFO):
        pretrain(*run, lower, MODEL, CPU, resume_at(tmp_path / "resume.pt", every=60, mode="any_settings"))
    assert "was written with other settings (settings.pretrain.learning_rate); continuing from it" in caplog.text
    assert f"resuming from {tmp_path / 'resume.pt'}" in caplog.text
    # The schedule went on from where it was, with the new peak: warm-up is off, so the learning rate
    # after epoch e of E is peak * (1 + cos(pi * e / E)) / 2.
    curve = read_curve(tmp_path / "curve.csv")
    assert int(curve[-2]["epoch"]) * 2 > done  # an epoch trained after the resume
    epoch = int(curve[-2]["epoch"])
    expected = lower["learning_rate"] * (1 + math.cos(math.pi * epoch / lower["epochs"])) / 2
    assert float(curve[-2]["learning_rate"]) == pytest.approx(expected, rel=1e-9)


def test_a_job_past_its_slurm_deadline_writes_its_state_and_stops(data_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 60))  # 60 s left, a margin of 120 s
    with pytest.raises(TrainingStopped, match=r"pretrain simclr stopped at epoch 1, step 1 of 2, 120 s before its "
                                              r"Slurm job's time limit"):
        pretrain(data_dir / "train_images.npy", data_dir / "normalization.json", tmp_path / "encoder.pt",
                 tmp_path / "curve.csv", LONG_PRETRAIN, MODEL, CPU, resume_at(tmp_path / "resume.pt", every=60))
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["state"]["step"] == 1


# ---------------------------------------------------------------------------------------------------
# Real processes: divergence, SIGKILL alone, under torchrun and under Snakemake
# ---------------------------------------------------------------------------------------------------

def test_a_non_finite_loss_names_the_step_and_keeps_the_last_resume_file(unlabeled_images, tmp_path):  # noqa: F811
    absurd = {**DDP_PRETRAIN, "processes": 1, "learning_rate": 1e30}
    result = subprocess.run(pretrain_command(unlabeled_images, tmp_path, absurd, checkpoint_every=0),
                            cwd=tmp_path, env=command_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.endswith(f"pretrain simclr: the loss became NaN or infinite at epoch 1, step 2 of 2; the last "
                              f"resume state ({tmp_path / 'resume.pt'}) is kept: lower the learning rate and "
                              "set config compute.resume: any_settings to continue from it"), result.stderr
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["state"]["step"] == 1
    assert not (tmp_path / "encoder.pt").exists()


def kill_when_resumable(alive, kill, resume_path: Path, timeout=120) -> None:
    """kill() a job a random moment after its first resume file appears; alive() says it still runs."""
    deadline = time.monotonic() + timeout
    while not resume_path.exists():
        assert alive(), "the job ended before it wrote a resume file"
        assert time.monotonic() < deadline, f"no resume file {resume_path} within {timeout} s"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    assert alive(), "the job finished before it could be killed"
    kill()


def kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        process.kill()


def test_two_data_parallel_ranks_killed_resume_to_the_weights_of_an_uninterrupted_run(
        unlabeled_images, tmp_path):  # noqa: F811
    settings = {**DDP_PRETRAIN, "epochs": 60}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for out in (whole, killed):
        out.mkdir()
    subprocess.run(pretrain_command(unlabeled_images, whole, settings), cwd=whole, env=command_env(),
                   check=True, capture_output=True, timeout=300)
    run = subprocess.Popen(pretrain_command(unlabeled_images, killed, settings, checkpoint_every=0),
                           cwd=killed, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # torchrun and its two ranks at once, as when a node is lost (the ranks have sessions of their own).
    kill_when_resumable(lambda: run.poll() is None, lambda: kill_tree(run.pid), killed / "resume.pt")
    run.wait()
    assert not (killed / "encoder.pt").exists()
    done = torch.load(killed / "resume.pt", weights_only=True)["state"]
    assert len(done["per_rank"]) == 2  # each rank's own RNG and batch order
    again = subprocess.run(pretrain_command(unlabeled_images, killed, settings, checkpoint_every=0),
                           cwd=killed, env=command_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {killed / 'resume.pt'} after epoch" in again.stderr
    assert_same_weights(load_checkpoint(killed / "encoder.pt")["encoder"],
                        load_checkpoint(whole / "encoder.pt")["encoder"])
    assert_same_losses(read_curve(killed / "curve.csv"), read_curve(whole / "curve.csv"), "loss")


def training_process(snakemake_process: subprocess.Popen, stage: str):
    """The `python -m ssl_pipeline <stage>` process Snakemake started, once it runs."""
    for _ in range(6000):
        for child in psutil.Process(snakemake_process.pid).children(recursive=True):
            try:
                if child.cmdline()[1:4] == ["-m", "ssl_pipeline", stage]:
                    return child
            except psutil.Error:
                continue
        assert snakemake_process.poll() is None, "Snakemake ended before the job started"
        time.sleep(0.05)
    raise AssertionError(f"no {stage} process started")


@pytest.mark.workflow
def test_a_job_killed_under_snakemake_resumes_when_the_same_command_runs_again(real_smoke_run, tmp_path):
    """SIGKILL, as the kernel's OOM killer or a lost node deals it: the job cannot write anything.
    The same command again resumes from the last resume file, to the weights of an uninterrupted run.
    Over 60 s (86 s in a full run (2-core AMD EPYC, 2026-12-02)): four Snakemake runs, two of them training a stage to its end."""
    reference, _ = real_smoke_run
    workdir = copy_workflow(tmp_path / "workflow")
    (workdir / "often.yaml").write_text(yaml.safe_dump({"compute": {"checkpoint_every": 0.002}}))
    for stage, target, resume_file, weights in [
        ("pretrain", "results/pretrain/simclr/base/seed0/encoder.pt", "results/resume/pretrain/simclr/base/seed0.pt",
         "encoder"),
        ("finetune", "results/finetune/simclr/base/seed0/fraction1/seed0/model.pt",
         "results/resume/finetune/simclr/base/seed0/fraction1/seed0.pt", "model"),
    ]:
        command = [sys.executable, "-m", "snakemake", target, "--cores", "2", *SMOKE, "often.yaml"]
        run = subprocess.Popen(command, cwd=workdir, env=tool_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        job = training_process(run, stage)
        kill_when_resumable(job.is_running, job.kill, workdir / resume_file)
        assert run.wait(timeout=120) != 0
        assert not (workdir / target).exists() and (workdir / resume_file).exists()

        again = subprocess.run(command, cwd=workdir, env=tool_env(), capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        log = workdir / "results" / "logs" / ("pretrain/simclr/base/seed0.log" if stage == "pretrain"
                                              else "finetune/simclr/base/seed0/fraction1/seed0.log")
        assert f"resuming from {resume_file} after" in log.read_text()
        assert not (workdir / resume_file).exists()
        assert_same_weights(load_checkpoint(workdir / target)[weights],
                            load_checkpoint(reference / target)[weights], target)
