"""End to end: `uncond train` on folders the tests write, with a tiny UNet on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (MESSY_SKIPPED, MESSY_USED, TINY_UNET, RunsCode, fast_train_args, mounted_tmpfs,
                      strict_json_lines, write_images, write_messy_folder)
from uncond import checkpoint, data, decoding, run_folder, sampling

WEIGHTS = "diffusion_pytorch_model.safetensors"


def checkpoints(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("checkpoint")}


def metric_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_trains_exports_and_diffusers_loads_it(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--num_epochs", "2", "--use_ema",
                                            "--save_images_epochs", "1", "--checkpointing_steps", "6",
                                            "--logging_steps", "2", "--logger", "tensorboard"))
    assert code == 0, err
    events = EventAccumulator(str(out / "logs" / "uncond"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("test_samples")] == [3, 6]  # the sample grids, in TensorBoard too
    grid = Image.open(out / "samples" / "step-0000006.png")
    assert (events.Images("test_samples")[-1].width, events.Images("test_samples")[-1].height) == grid.size
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6]
    for name in ("model_index.json", f"unet/{WEIGHTS}", "unet/config.json", "scheduler/scheduler_config.json",
                 "training_config.json", "README.md", "loss.png", "data_report.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all({"loss", "lr", "ema_decay", "images_per_sec"} <= set(r) for r in records)
    assert json.loads((out / "training_config.json").read_text())["seed"] == 0

    pipeline = DiffusionPipeline.from_pretrained(out)
    assert type(pipeline).__name__ == "DDPMPipeline"
    image = pipeline(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
    assert image.size == (16, 16) and image.mode == "RGB"

    # the export holds the EMA weights, not the raw trained ones
    exported = load_file(out / "unet" / WEIGHTS)
    ema = load_file(out / "checkpoint-6" / "unet_ema" / WEIGHTS)
    raw = load_file(out / "checkpoint-6" / "unet" / WEIGHTS)
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    assert not all(torch.equal(exported[k], raw[k]) for k in exported)


def test_wandb_offline_logs_metrics_and_samples_in_the_logging_dir(run_cli, color_folder, tiny_unet, tmp_path,
                                                                   monkeypatch):
    pytest.importorskip("wandb")  # optional: pip install -e ".[wandb]"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "3",
                                            "--logger", "wandb", "--logging_steps", "1"))
    assert code == 0, err
    runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert list(runs[0].rglob("media/images/test_samples_3_*.png"))
    assert not (tmp_path / "wandb").exists()  # nothing in the working directory


def test_logger_all_names_the_tracker_that_did_not_start_and_leaves_no_folder(run_cli, color_folder, tiny_unet,
                                                                              tmp_path, monkeypatch):
    """Of several trackers, the one that failed is named, and those started before it are ended before the folder
    is cleaned up (W&B wrote its files into it at exit)."""
    import accelerate.tracking as trackers
    from accelerate.utils import LoggerType

    ended = []

    class Unreachable(trackers.GeneralTracker):
        name, requires_logging_directory, main_process_only = "mlflow", False, True

        def __init__(self, *args, **kwargs):
            super().__init__()

        def start(self):  # accelerate starts every tracker made, in turn
            raise RuntimeError("no tracking server at http://mlflow:5000")

        @property
        def tracker(self):
            return None

    finish = trackers.TensorBoardTracker.finish
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [LoggerType.TENSORBOARD, LoggerType.MLFLOW])
    monkeypatch.setitem(trackers.LOGGER_TYPE_TO_CLASS, "mlflow", Unreachable)
    monkeypatch.setattr(trackers.TensorBoardTracker, "finish", lambda self: ended.append(1) or finish(self))
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1"), "--logger", "all")
    one_line_error(code, err, "--logger all: mlflow did not start (no tracking server at http://mlflow:5000); choose "
                              "another --logger")
    assert ended == [1] and not out.exists()


def test_a_resumed_run_goes_on_in_the_same_wandb_run(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """Each resume after a preemption started one more W&B run; it now goes on with the checkpoint's (by its id),
    and a run started afresh gets its own."""
    from accelerate import Accelerator

    asked, init_trackers = [], Accelerator.init_trackers

    def recording(self, project_name, config=None, init_kwargs=None):
        asked.append(init_kwargs["wandb"])
        return init_trackers(self, project_name, config, init_kwargs)

    monkeypatch.setattr(Accelerator, "init_trackers", recording)
    out = tmp_path / "cats-64"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logger", "tensorboard")
    assert run_cli(*args, "--max_train_steps", "2")[0] == 0
    assert run_cli(*args, "--max_train_steps", "4")[0] == 0  # resumed from checkpoint-2
    assert run_cli(*args, "--max_train_steps", "2", "--overwrite_output_dir")[0] == 0
    assert asked[0]["id"] == asked[1]["id"] != asked[2]["id"]
    assert {(kwargs["name"], kwargs["resume"]) for kwargs in asked} == {("cats-64", "allow")}


def test_a_tracker_that_cannot_start_is_one_line_before_the_data_is_read(run_cli, color_folder, tiny_unet, tmp_path,
                                                                          monkeypatch):
    """--logger wandb without `wandb login` was a traceback, after the images were decoded."""
    from accelerate import Accelerator

    def not_logged_in(self, *args, **kwargs):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(Accelerator, "init_trackers", not_logged_in)
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1")
    code, _, err = run_cli(*args, "--logger", "tensorboard")  # over the suite's --logger none
    one_line_error(code, err, "--logger tensorboard: the tracker did not start (No API key configured. Use `wandb "
                              "login` to log in.)")
    assert not (color_folder.parent / "image-cache").exists()


@pytest.mark.parametrize("flag, expected", [((), "bf16"), (("--mixed_precision", "no"), "no")])
def test_mixed_precision_comes_from_the_flag_else_the_launcher(run_cli, color_folder, tiny_unet, tmp_path,
                                                               monkeypatch, flag, expected):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` passes its config's setting
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1", *flag))
    assert code == 0, err
    assert f"precision {expected}" in err
    assert "on 12 images | 1 process on cpu" in err and "1 optimizer step (3 per epoch, 1 epoch)" in err
    assert json.loads((out / "training_config.json").read_text())["mixed_precision"] == expected
    assert f"--mixed_precision {expected}" in (out / "README.md").read_text()  # its commands run as it did


def test_checkpoint_rotation_keeps_the_newest(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "6",
                                            "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"))
    assert code == 0, err
    assert checkpoints(out) == {"checkpoint-4", "checkpoint-6"}
    assert "checkpoint-6 (removed checkpoint-2: --checkpoints_total_limit 2)" in err  # it was removed unsaid


def test_milestone_checkpoints_are_kept_beside_the_newest(run_cli, color_folder, tiny_unet, tmp_path):
    """A long run kept only its newest checkpoints: going back to one of last week's was not possible."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "8", "--save_images_epochs", "100",
                           "--keep_checkpoints_every", "3")
    code, _, err = run_cli(*args, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert code == 0, err
    assert checkpoints(out) == {"checkpoint-3", "checkpoint-6", "checkpoint-7", "checkpoint-8"}
    # going on without the flag: the milestones kept stay (they were removed, unsaid)
    code, _, err = run_cli(*args[:-2], "--max_train_steps", "10", "--checkpointing_steps", "1",
                           "--checkpoints_total_limit", "2")
    assert code == 0 and "keep_checkpoints_every 3 -> None" in err, err
    assert checkpoints(out) == {"checkpoint-3", "checkpoint-6", "checkpoint-9", "checkpoint-10"}
    code, _, err = run_cli(*args, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    one_line_error(code, err, "--keep_checkpoints_every 3 is not a multiple of --checkpointing_steps 2")
    code, _, err = run_cli(*args, "--checkpointing_steps", "1")
    one_line_error(code, err, "there is no limit (every checkpoint is kept); pass --checkpoints_total_limit N")


def test_resume_from_a_named_checkpoint_and_from_latest(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "6")[0] == 0
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    (tmp_path / "elsewhere" / "checkpoint-4").mkdir(parents=True)  # another run's, in the current folder
    monkeypatch.chdir(tmp_path / "elsewhere")  # a bare name means --output_dir's, as in the seed script

    code, _, err = run_cli(*args, "--max_train_steps", "8", "--resume_from_checkpoint", "checkpoint-4",
                           "--checkpoints_total_limit", "2")
    assert code == 0, err
    assert "resuming from" in err and "checkpoint-4" in err
    assert checkpoints(out) == {"checkpoint-6", "checkpoint-8"}
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6, 7, 8]  # steps 5-6 rewritten, never twice

    code, _, err = run_cli(*args, "--max_train_steps", "10", "--resume_from_checkpoint", "latest")
    assert code == 0, err
    assert "checkpoint-8 at step 8" in err
    assert metric_steps(out) == list(range(1, 11))


def test_resuming_past_the_runs_last_step_is_refused(run_cli, color_folder, tiny_unet, tmp_path):
    """A checkpoint at step 6 resumed with --max_train_steps 2 trained "-13 epochs" and exported its weights."""
    first = tmp_path / "first"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, first, "--max_train_steps", "6"))[0] == 0
    resume = ["--resume_from_checkpoint", str(first / "checkpoint-6")]
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "a", "--max_train_steps", "2",
                                            *resume))
    one_line_error(code, err, "checkpoint-6 is at step 6, past this run's last step 2: nothing to train "
                              "(--max_train_steps counts the whole run, the checkpoint's steps included)")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "c", "--max_train_steps", "5",
                                            *resume))
    one_line_error(code, err, "checkpoint-6 is at step 6, past this run's last step 5")  # one step past it too
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "b", "--num_epochs", "1", *resume))
    one_line_error(code, err, "checkpoint-6 is at step 6, past this run's last step 3: nothing to train "
                              "(--num_epochs counts")
    assert not (tmp_path / "a" / "unet").exists() and not (tmp_path / "b" / "unet").exists()


def test_rerunning_the_same_command_continues_the_run(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "3", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "3")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "6")
    assert code == 0, err
    assert "resuming from checkpoint-3 at step 3" in err
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    # step 3 ended epoch 0, whose preview and export the first run made: checkpoint-3 was written after them,
    # so the resumed run does not make them again
    assert "exported the pipeline at step 3 " not in err and "step-0000003.png" not in err, err
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]


def train_straight_and_interrupted(run_cli, color_folder, tiny_unet, tmp_path) -> tuple[Path, Path]:
    """An 8-step run, and the same run as if killed after its step-4 checkpoint."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for out in (straight, interrupted):
        assert run_cli(*fast_train_args(color_folder, tiny_unet, out, *RESUMED_RUN))[0] == 0
    for leftover in ("checkpoint-8", "unet", "scheduler", "model_index.json"):
        path = interrupted / leftover
        __import__("shutil").rmtree(path) if path.is_dir() else path.unlink()
    return straight, interrupted


RESUMED_RUN = ("--max_train_steps", "8", "--checkpointing_steps", "4", "--use_ema", "--random_flip",
               "--gradient_accumulation_steps", "2", "--save_images_epochs", "100", "--save_model_epochs", "100")


def assert_same_final_weights(straight: Path, interrupted: Path) -> None:
    for folder in ("unet", "unet_ema"):
        a = load_file(straight / "checkpoint-8" / folder / WEIGHTS)
        b = load_file(interrupted / "checkpoint-8" / folder / WEIGHTS)
        assert all(torch.equal(a[k], b[k]) for k in a), folder


@pytest.mark.parametrize("poisoned", ["optimizer.bin", "random_states_0.pkl", "scheduler.bin"])
def test_a_checkpoint_is_never_unpickled(run_cli, color_folder, tiny_unet, tmp_path, poisoned):
    """A checkpoint may come from anywhere (a colleague's run, a download): each of accelerate's state files,
    with its manifest made to match, is read as data only; the code pickled into it never runs."""
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--checkpointing_steps", "1")
    assert run_cli(*args, "--max_train_steps", "1")[0] == 0
    saved = tmp_path / "run" / "checkpoint-1"
    marker = tmp_path / "marker"
    torch.save({"state": RunsCode(marker)}, saved / poisoned)
    checkpoint.write_manifest(saved, 1)  # as a forger would: the file passes the damage check
    code, _, err = run_cli(*args, "--max_train_steps", "2")
    assert not marker.exists()
    if poisoned.startswith("random_states"):  # accelerate passes over random states it cannot read; uncond draws
        assert code == 0, err                 # its noise from (seed, step) and needs none of them
    else:
        one_line_error(code, err, f"cannot resume from {saved}")
        assert "weights_only" not in err  # nor torch's advice to unpickle it in full


def test_resumed_run_ends_with_the_same_weights(run_cli, color_folder, tiny_unet, tmp_path):
    """Stop after the step-4 checkpoint of an 8-step run, resume, and compare with the run that never stopped."""
    straight, interrupted = train_straight_and_interrupted(run_cli, color_folder, tiny_unet, tmp_path)
    assert run_cli(*fast_train_args(color_folder, tiny_unet, interrupted, *RESUMED_RUN))[0] == 0
    assert_same_final_weights(straight, interrupted)


def test_a_checkpoint_from_before_the_data_order_change_resumes_in_its_order(run_cli, color_folder, tiny_unet,
                                                                            tmp_path, monkeypatch):
    """Runs begun with the first data order (seed + epoch), whose checkpoints have no "data_order", go on in it."""
    monkeypatch.setattr(data, "DATA_ORDER", 1)
    straight, interrupted = train_straight_and_interrupted(run_cli, color_folder, tiny_unet, tmp_path)
    state_file = interrupted / "checkpoint-4" / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("data_order") == 1
    state_file.write_text(json.dumps(state))
    checkpoint.write_manifest(state_file.parent, 4)
    monkeypatch.setattr(data, "DATA_ORDER", 2)
    assert run_cli(*fast_train_args(color_folder, tiny_unet, interrupted, *RESUMED_RUN))[0] == 0
    assert_same_final_weights(straight, interrupted)
    assert json.loads((interrupted / "checkpoint-8" / "training_state.json").read_text())["data_order"] == 1


def test_an_output_folder_inside_the_image_folder_is_not_read_as_images(run_cli, color_folder, tiny_unet):
    """Its sample grids and loss plot were read as training images by the next run, which resumed on them."""
    out = color_folder / "runs" / "first"
    for steps in ("2", "4"):
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", steps,
                                                "--checkpointing_steps", "2"))
        assert code == 0, err
        assert "data: 12 images" in err and f"uncond run and sample folders left out: {out}" in err, err
    assert "resuming from checkpoint-2" in err
    generated = color_folder / "generated"  # `uncond sample`'s images are not trained on either
    assert run_cli("sample", out, "--num_images", 2, "--steps", 1, "--output_dir", generated)[0] == 0
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "6",
                                            "--checkpointing_steps", "2"))
    assert code == 0 and "data: 12 images" in err and str(generated) in err, err


def test_a_readme_of_the_user_in_the_output_folder_is_never_replaced(run_cli, color_folder, tiny_unet, tmp_path):
    """The model card is README.md: a project's own README (an --output_dir of .) was silently replaced."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("# My project\n")
    for extra in ((), ("--overwrite_output_dir",)):
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1", *extra))
        one_line_error(code, err, "holds a README.md that uncond did not write")
        assert (out / "README.md").read_text() == "# My project\n"
    (out / "README.md").unlink()
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1"))[0] == 0
    # its own card is replaced, by a re-run as by --overwrite_output_dir
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1",
                                    "--overwrite_output_dir"))[0] == 0


def test_train_data_dir_beside_dataset_name_is_said_to_be_ignored(run_cli, color_folder, tiny_unet, tmp_path):
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--dataset_name",
                                            "builtin:mnist", "--dry_run"))
    assert code == 0 and f"--train_data_dir {color_folder} is ignored: --dataset_name builtin:mnist" in err


def test_a_broken_link_in_the_image_folder_is_skipped_and_reported(run_cli, color_folder, tiny_unet, tmp_path):
    (color_folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "run"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run"))[0] == 0  # it raised when listing
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1"))
    assert code == 0, err
    skipped = json.loads((out / "data_report.json").read_text())["skipped"]
    assert [entry["name"] for entry in skipped] == [str(color_folder / "gone.png")]


def test_ctrl_c_during_a_preview_stops_at_that_step(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """It said nothing until the preview ended, then trained one more step before stopping."""
    import os
    import signal

    from uncond import train

    def interrupted_grid(run, unet):
        if run.step == 3:  # the end of epoch 0 (12 images, batch 4)
            os.kill(os.getpid(), signal.SIGINT)
        original_grid(run, unet)

    original_grid = train.save_sample_grid
    monkeypatch.setattr(train, "save_sample_grid", interrupted_grid)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "12"))
    assert code == 130, err  # the shell's status for SIGINT: `uncond train ... && next` goes no further
    assert "SIGINT: stopping with a checkpoint after the current step" in err
    assert "stopped by SIGINT at step 3, checkpoint-3 saved" in err


def test_sample_grids_come_every_save_images_epochs_from_the_first_epoch_and_at_the_end(run_cli, color_folder,
                                                                                      tiny_unet, tmp_path):
    """The seed script's `epoch % save_images_epochs == 0 or epoch == num_epochs - 1`: epochs 0, 2 and 3 of 4 (two
    steps each at batch 6)."""
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "6", "--num_epochs",
                                            "4", "--save_images_epochs", "2", "--save_model_epochs", "100"))
    assert code == 0, err
    assert sorted(path.name for path in (out / "samples").iterdir()) == [
        "step-0000002.png", "step-0000006.png", "step-0000008.png"]


def test_a_stop_while_a_checkpoint_loads_is_a_stop_not_a_damaged_checkpoint(run_cli, color_folder, tiny_unet,
                                                                             tmp_path, monkeypatch):
    """safetensors makes its tensors through torch from Rust: the stop a SIGTERM raised in there came out as a
    ValueError, and the resume ended "cannot read ...safetensors; resume from another checkpoint", status 2
    (bad input: a scheduler does not retry; the user went back to an older checkpoint) (trial 55 F2)."""
    import signal

    from uncond import checkpoint

    load_file = checkpoint.load_file

    def signalled_inside(path):  # as the library does with an exception raised while it runs
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return load_file(path)
        except BaseException:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "3")
    assert run_cli(*args, "--max_train_steps", "3")[0] == 0
    monkeypatch.setattr(checkpoint, "load_file", signalled_inside)
    code, _, err = run_cli(*args, "--max_train_steps", "6")
    assert code == 143 and "cannot read" not in err and "stopped by SIGTERM" in err, err
    monkeypatch.setattr(checkpoint, "load_file", load_file)
    code, _, err = run_cli(*args, "--max_train_steps", "6")
    assert code == 0 and "resuming from checkpoint-3" in err, err


def test_a_job_started_with_sigint_ignored_keeps_ignoring_it(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """A shell without job control starts `uncond train ... &` with SIGINT ignored (so that a Ctrl-C meant for the
    foreground does not reach it); the run set its own handler over that, so the same `kill -INT` was ignored in
    the job's first seconds and stopped it later (trial 55). Ignored throughout now; SIGTERM stops it."""
    import signal

    from uncond import train

    def signalled(run, micro_batches, train_step=train.train_step):
        if run.step in (2, 3):
            os.kill(os.getpid(), signal.SIGINT if run.step == 2 else signal.SIGTERM)
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "train_step", signalled)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "6"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # as it found it
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 143 and "stopped by SIGTERM at step 4, checkpoint-4 saved" in err, err
    assert "SIGINT" not in err


@pytest.mark.parametrize("signal_name, raised", [("SIGINT", KeyboardInterrupt), ("SIGTERM", SystemExit)])
def test_a_signal_stops_a_python_caller_once_the_checkpoint_is_saved(color_folder, tiny_unet, tmp_path, monkeypatch,
                                                                    capsys, signal_name, raised):
    """uncond.main returned 130: a notebook's loop of runs went on to the next run after Interrupt the kernel,
    and a sample after it sampled the stopped run's model."""
    import signal

    import uncond
    from conftest import reset_accelerate
    from uncond import train

    def signalled(run, micro_batches, train_step=train.train_step):
        if run.step == 2:
            os.kill(os.getpid(), getattr(signal, signal_name))
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "train_step", signalled)
    finished = []
    with pytest.raises(raised) as stopped:
        for learning_rate in ("1e-3", "5e-4"):
            reset_accelerate()
            uncond.main(fast_train_args(color_folder, tiny_unet, tmp_path / learning_rate, "--max_train_steps", 12,
                                        "--learning_rate", learning_rate))
            finished.append(learning_rate)
    assert finished == [] and not (tmp_path / "5e-4").exists()
    assert f"stopped by {signal_name} at step 3, checkpoint-3 saved" in capsys.readouterr().err
    assert (tmp_path / "1e-3" / "checkpoint-3").is_dir()
    if raised is SystemExit:
        assert stopped.value.code == 143  # a script's status, as the shell's for SIGTERM


def test_a_run_from_python_works_under_the_callers_settings_and_leaves_them_as_they_were(color_folder, tiny_unet,
                                                                                        tmp_path, capsys):
    """uncond's own logger was set to INFO, not to propagate, and left so: a notebook could not quieten it; the
    decoding's filter of Pillow's DecompressionBombWarning stayed in the caller's warnings filters; and a caller's
    float64 default dtype built a float64 UNet that the float32 batches failed in, after the decoding."""
    import logging
    import warnings

    import uncond
    from conftest import reset_accelerate

    uncond_logger = logging.getLogger("uncond")
    before = list(warnings.filters)
    uncond_logger.setLevel(logging.WARNING)
    torch.set_default_dtype(torch.float64)
    try:
        reset_accelerate()
        assert uncond.main(fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", 1)) == 0
        assert "done:" not in capsys.readouterr().err
        assert {tensor.dtype for tensor in load_file(tmp_path / "run" / "unet" / WEIGHTS).values()} == {torch.float32}
        assert uncond_logger.level == logging.WARNING and uncond_logger.propagate and not uncond_logger.handlers
        assert warnings.filters == before and torch.get_default_dtype() == torch.float64
    finally:
        uncond_logger.setLevel(logging.NOTSET)
        torch.set_default_dtype(torch.float32)


def test_images_per_second_leave_out_previews(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    import time

    from uncond import train

    # The step-3 preview takes 1000 s on the clock the run reads (none on the wall's): a step of this tiny model
    # takes under 0.1 s on a quiet machine, 2.3 s on the most loaded one seen, so the two cannot be confused.
    preview_seconds, real_clock = [0.0], time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + preview_seconds[0])
    original_grid = train.save_sample_grid

    def slow_grid(run, unet):
        preview_seconds[0] += 1000.0 if run.step == 3 else 0.0
        return original_grid(run, unet)

    monkeypatch.setattr(train, "save_sample_grid", slow_grid)
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4", "--logging_steps", "1")
    assert run_cli(*args)[0] == 0
    rates = {record["step"]: record["images_per_sec"] for record in map(json.loads, (out / "metrics.jsonl").open())}
    assert preview_seconds[0] == 1000.0  # the step-3 preview was drawn
    # The interval after the step-3 preview, one step of 4 images: with the preview's 1000 s counted, over 1000 s.
    assert rates[4] > 4 / 100, rates


def test_a_batch_beyond_the_data_says_what_each_step_trains_on():
    """3 images on 4 processes: each process takes one, so a step trains on 4, one image twice (the warning said
    each step trained on the 3)."""
    from uncond.train import batch_beyond_data

    assert batch_beyond_data(4, 4, 3) == ("--train_batch_size 4 x 4 processes is more than the 3 images: each step "
                                          "trains on the 3 there are, 1 of them twice so that each process "
                                          "has 1")
    assert batch_beyond_data(8, 2, 12).endswith("each step trains on the 12 there are")  # 6 each
    assert batch_beyond_data(4, 2, 8) is None


def test_more_accumulation_than_an_epoch_has_batches_says_what_each_step_trains_on(run_cli, color_folder, tiny_unet,
                                                                                  tmp_path):
    """12 images, batch 4, --gradient_accumulation_steps 5: the summary said a global batch of 20, and each step
    trained on the epoch's 12 images, unsaid (trial 66 F3)."""
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "2",
                                            "--gradient_accumulation_steps", "5", "--logging_steps", "1"))
    assert code == 0, err
    assert ("--gradient_accumulation_steps 5 is at least the 3 batches of 4 an epoch of 12 images makes per "
            "process: each optimizer step ends with its epoch, on 12 images, not the global batch of 20") in err, err
    seen = [record["images_seen"] for record in strict_json_lines(tmp_path / "run" / "metrics.jsonl")]
    assert seen == [12, 24]
    from uncond.config import TrainConfig
    from uncond.train import accumulation_beyond_epoch  # as many batches, the last one short (trial 67 F5)

    settings = TrainConfig(train_batch_size=4, gradient_accumulation_steps=2)
    assert "on 12 images, not the global batch of 16" in accumulation_beyond_epoch(settings, 2, 12)
    assert "on 10 images, not the global batch of 12" in accumulation_beyond_epoch(settings.replace(
        gradient_accumulation_steps=3), 1, 10)
    assert accumulation_beyond_epoch(settings, 2, 16) is None  # whole global batches
    assert accumulation_beyond_epoch(settings, 1, 20) is None  # 5 batches: steps of 2, 2 and 1


def test_images_per_second_count_the_images_trained_on(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """--train_batch_size 1000 on 12 images trains 12 a step: images/s counted 1000 a step (83 times too many)."""
    import time

    from uncond import train

    train_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda run, batches: (time.sleep(0.5), train_step(run, batches))[1])
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "1000", "--max_train_steps", "2",
                           "--logging_steps", "1")
    code, _, err = run_cli(*args)
    assert code == 0 and "--train_batch_size 1000 x 1 process is more than the 12 images: each step trains on the 12 " \
        "there are" in err, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [record["images_seen"] for record in records] == [12, 24]
    assert all(record["images_per_sec"] <= 12 / 0.5 for record in records), records  # each step took over 0.5 s


def test_grayscale_folder_trains_a_one_channel_model(run_cli, gray_folder, tiny_unet, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # on a terminal, the grid's bar shows (below)
    code, _, err = run_cli(*fast_train_args(gray_folder, tiny_unet, out, "--max_train_steps", "2",
                                            "--model_config_name_or_path", "", "--model_preset", "tiny",
                                            "--resolution", "16"))
    assert code == 0, err
    assert "every image is grayscale, training a 1-channel model" in err
    # the grid's bar counts its steps (DDPM's 1,000 take minutes; it was silent on a terminal too)
    assert re.search(r"sampling 4 images: +0%.* 0/2 \[.*step/s", err)
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["in_channels"] == config["out_channels"] == 1
    grid = (out / "samples" / "step-0000002.png")
    assert __import__("PIL.Image").Image.open(grid).mode == "L"


def test_a_messy_folder_trains_and_a_second_run_decodes_nothing(run_cli, tiny_unet, tmp_path, monkeypatch):
    folder = write_messy_folder(tmp_path / "messy")
    # --dry_run counts the image files it finds, and says those whose headers it cannot open
    planned = fast_train_args(folder, tiny_unet, tmp_path / "planned", "--num_epochs", "1", "--dry_run")
    with warnings.catch_warnings(record=True) as warned:  # the huge image's: Pillow's warning printed before
        warnings.simplefilter("always")
        code, _, err = run_cli(*planned)
    assert not [warning for warning in warned if warning.category is Image.DecompressionBombWarning]
    assert code == 0 and f"{len(MESSY_USED) + len(MESSY_SKIPPED)} image files" in err, err
    assert "cannot be opened (" in err and "not_an_image.jpg" in err and "would be left out" in err
    assert "5 optimizer steps per epoch" in err  # 18 files in batches of 4
    assert "not images by their extension, passed over: 1 .txt" in err  # said by the run only
    first = tmp_path / "first"
    code, _, err = run_cli(*fast_train_args(folder, tiny_unet, first, "--max_train_steps", "2"))
    assert code == 0, err
    summary = [line for line in err.splitlines() if "data: " in line]
    assert len(summary) == 1 and f"{len(MESSY_USED)} images" in summary[0] and "decoded into the cache" in summary[0]
    assert f"{len(MESSY_SKIPPED)} skipped (" in summary[0] and "all in data_report.json" in summary[0]
    report = json.loads((first / "data_report.json").read_text())
    assert report["used"] == len(MESSY_USED) and report["upscaled"] == 1
    assert [Path(name).name for name in report["upscaled_images"]] == ["small.png"]  # it said only how many
    assert sorted(Path(item["name"]).name for item in report["skipped"]) == MESSY_SKIPPED
    assert all(item["reason"] for item in report["skipped"])

    decodes = []
    decode_image = decoding.decode_image
    monkeypatch.setattr(decoding, "decode_image", lambda *args: decodes.append(1) or decode_image(*args))
    code, _, err = run_cli(*fast_train_args(folder, tiny_unet, tmp_path / "second", "--max_train_steps", "2"))
    assert code == 0, err
    assert decodes == [] and "read from the cache" in err
    assert json.loads((tmp_path / "second" / "data_report.json").read_text()) == report
    # once decoded, --dry_run counts the images the run trains on, as the run does (it said 5 steps per epoch)
    code, _, err = run_cli(*planned)
    assert code == 0 and f"({len(MESSY_USED)} images, " in err and f"{len(MESSY_SKIPPED)} skipped when decoded" in err
    assert "3 optimizer steps per epoch" in err
    # a photo added: the files less those the earlier decode left out (it said 5 steps; the run takes 4)
    Image.new("RGB", (20, 20), "red").save(folder / "added.png")
    code, _, err = run_cli(*planned)
    assert code == 0 and "1 image to decode" in err and "4 optimizer steps per epoch" in err, err


def test_model_config_can_come_from_a_pipeline_folder(run_cli, color_folder, tiny_unet, tmp_path):
    first = tmp_path / "first"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, first, "--max_train_steps", "1"))[0] == 0
    second = tmp_path / "second"
    code, _, err = run_cli(*fast_train_args(color_folder, first, second, "--max_train_steps", "1"))
    assert code == 0, err
    assert json.loads((second / "unet" / "config.json").read_text())["block_out_channels"] == [8, 16]


@pytest.mark.parametrize("changes, expected", [
    ({"num_class_embeds": 10}, "describes a class-conditional UNet2DModel (num_class_embeds 10, class_embed_type "
                               "None); uncond trains unconditional networks"),  # it crashed at the first step
    ({"time_embedding_type": "fourier"}, "time_embedding_type fourier takes the logarithm of the timestep"),  # NaN
    ({"time_embedding_type": "learned", "num_train_timesteps": 100}, "its learned time embedding has 100 "
     "timesteps, fewer than --ddpm_num_steps 1000; set its num_train_timesteps to 1000"),  # an index error
    ({"sample_size": [32, 16]}, "its sample_size [32, 16] is not square, and uncond trains square images; pass "
                                "--resolution N"),  # it trained at 64 px without a word
    ({"sample_size": 15}, "'s sample_size 15 is not divisible by 2 (the model halves it 1 times); pass "
                          "--resolution 14 or 16"),
])
def test_model_configs_uncond_cannot_train_are_refused_before_any_work(run_cli, color_folder, tmp_path, changes,
                                                                       expected):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({**TINY_UNET, **changes}))
    code, _, err = run_cli("train", "--train_data_dir", color_folder, "--model_config_name_or_path", config,
                           "--output_dir", tmp_path / "run", "--dry_run")
    one_line_error(code, err, expected)
    code, _, err = run_cli("train", "--train_data_dir", color_folder, "--model_config_name_or_path",
                           tmp_path / "missing.json", "--output_dir", tmp_path / "run", "--dry_run")
    one_line_error(code, err, "missing.json: no such file")


def test_a_square_sample_size_given_as_a_list_sets_the_resolution(run_cli, color_folder, tmp_path):
    config = tmp_path / "unet.json"
    config.write_text(json.dumps({**TINY_UNET, "sample_size": [16, 16]}))  # as diffusers writes some configs
    code, stdout, err = run_cli("train", "--train_data_dir", color_folder, "--model_config_name_or_path", config,
                                "--output_dir", tmp_path / "run", "--dry_run")
    assert code == 0 and '"resolution": 16' in stdout, err


def test_a_model_config_sets_the_resolution_unless_given(run_cli, color_folder, tiny_unet, tmp_path):
    args = ("train", "--train_data_dir", color_folder, "--model_config_name_or_path", tiny_unet, "--output_dir",
            tmp_path / "run", "--dry_run")
    code, stdout, err = run_cli(*args)  # the seed's 64 px default trained this 16 px model on 64 px images
    assert code == 0 and '"resolution": 16' in stdout and "--resolution 16: the sample_size of" in err
    code, stdout, err = run_cli(*args, "--resolution", "32")
    assert code == 0 and '"resolution": 32' in stdout and "sample_size of" not in err


def test_flags_that_do_nothing_here_are_said_to(run_cli, color_folder, tiny_unet, tmp_path):
    """--image_column and --dataset_config_name with a --train_data_dir folder, and --hub_token without
    --push_to_hub, were accepted without a word (the run then trained on the folder, and uploaded nothing)."""
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--dry_run", "--image_column",
                                            "img", "--dataset_config_name", "small", "--hub_token", "hf_secret123"))
    assert code == 0, err
    assert f"--image_column img is ignored: it applies to --dataset_name, and --train_data_dir {color_folder}'s " \
           "files are the images" in err and "--dataset_config_name small is ignored" in err
    assert "--hub_token: used only to upload the model, and --push_to_hub is not given" in err
    assert "hf_secret123" not in err
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--dry_run", "--hub_model_id",
                                            "me/model", "--hub_private_repo", "--ema_power", "0.5", "--lr_num_cycles",
                                            "3"))
    assert code == 0, err
    assert "--hub_model_id, --hub_private_repo: used only to upload the model, and --push_to_hub is not given" in err
    assert "--ema_power: ignored without --use_ema" in err
    assert "--lr_num_cycles is ignored: it applies to --lr_scheduler cosine_with_restarts, not cosine" in err
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--dry_run",
                                            "--ddpm_beta_schedule", "squaredcos_cap_v2", "--ddpm_beta_end", "0.03"))
    assert code == 0 and "--ddpm_beta_end: ignored by --ddpm_beta_schedule squaredcos_cap_v2" in err, err


def test_dry_run_reports_and_writes_nothing(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    out = tmp_path / "run"
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run"))
    assert code == 0, err
    assert json.loads(stdout)["train_batch_size"] == 4  # stdout is the settings alone, for a script to read
    assert "12 image files" in err and "parameters with 3 channels" in err  # the config file says 3
    assert "schedule: batch 4 per device x 1 process x 1 accumulation = 4; 3 optimizer steps per epoch" in err
    assert "warning" not in err
    # under a launcher of two processes (the environment torchrun gives each): said once, for two
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run"))
    assert code == 0 and "x 2 processes x 1 accumulation = 8; 2 optimizer steps per epoch" in err
    monkeypatch.setenv("RANK", "1")
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run"))[:2] == (0, "")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run", "--lr_warmup_steps",
                                                 "500", "--max_train_steps", "10"))  # the seed's warmup in a short run
    assert "--lr_warmup_steps 500 is longer than the run's 10 optimizer steps: the learning rate never " \
           "reaches --learning_rate 0.0001" in err and json.loads(stdout)["lr_warmup_steps"] == 500
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "warmup", "--lr_warmup_steps", "500",
                                            "--num_epochs", "1"))  # the run says it too, with steps from epochs
    assert code == 0 and "--lr_warmup_steps 500 is longer than the run's 3 optimizer steps" in err
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run", "--model_preset", "tiny",
                                                 "--model_config_name_or_path", ""))
    assert code == 0, err
    # auto: the run above decoded these colour images, so the run will train 3 channels (else it could be either)
    assert "parameters with 3 channels" in err and "1 channel" not in err
    # the seed's --ddpm_num_inference_steps, given: its sample grids were DDPM's
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run",
                                                 "--ddpm_num_inference_steps", "50"))
    assert code == 0, err
    assert '"sampler": "ddpm"' in stdout and '"ddpm_num_inference_steps": 50' in stdout
    assert "starts at timestep" not in err  # 50 of DDPMPipeline's leading steps start at 980: as good as pure noise
    # ... but 5 start at 800, and the grids would stay noisy without a word (trial 41 saw it in uncond sample)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run",
                                            "--ddpm_num_inference_steps", "5"))
    assert code == 0 and "ddpm with 5 steps starts at timestep 800, not at 999" in err, err
    assert "give it --ddpm_num_inference_steps 1000, or use a fast sampler" in err
    # a shorter schedule: DDPM's previews take each of its timesteps (the default 1000 was refused as too many)
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run", "--sampler", "ddpm",
                                                 "--ddpm_num_steps", "200"))
    assert code == 0 and json.loads(stdout)["ddpm_num_inference_steps"] == 200, err
    assert "--ddpm_num_steps 200 with --ddpm_beta_schedule linear keeps 36% of the image in the noisiest training " \
           "input, but sampling starts from pure noise; raise --ddpm_num_steps, or use" in err
    # with another --sampler too (a migrated script and a new flag): the steps flag does not apply, and is said so
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--dry_run", "--sampler", "unipc",
                                                 "--ddpm_num_inference_steps", "50"))
    assert code == 0 and "--ddpm_num_inference_steps 50 is for the ddpm sampler; the previews use --sampler " \
                         "unipc with --sample_steps 2" in err, err
    assert not out.exists()


def test_a_run_found_in_the_output_dir_is_resumed_on_other_images_only_when_asked(run_cli, color_folder, tiny_unet,
                                                                                  tmp_path):
    out, other_images = tmp_path / "run", write_images(tmp_path / "other", 12, seed=1)
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2", "--logging_steps", "1",
                                    "--checkpointing_steps", "2"))[0] == 0
    args = fast_train_args(other_images, tiny_unet, out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                           "--logging_steps", "1")
    code, _, err = run_cli(*args)
    one_line_error(code, err, f"holds a run on other images (train_data_dir: {color_folder} -> {other_images}); "
                              "pass --resume_from_checkpoint latest")
    code, _, err = run_cli(*args, "--resume_from_checkpoint", "latest")
    assert code == 0, err
    assert "resuming from checkpoint-2 at step 2" in err and metric_steps(out) == [1, 2, 3, 4]


def test_piecewise_constant_schedule_follows_its_step_rules(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4", "--logging_steps",
                                            "1", "--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:2,0.1"))
    assert code == 0, err
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([1e-4, 1e-5, 1e-5, 1e-5])
    assert "--lr_warmup_steps 1 is ignored: --lr_scheduler piecewise_constant has no warmup" in err


@pytest.mark.parametrize("schedule, option, rates", [
    ("cosine_with_restarts", ("--lr_num_cycles", "2"), [5e-5, 1e-4, 5e-5, 0]),  # back at the peak halfway
    ("polynomial", ("--lr_power", "2"), [(1e-4 - 1e-7) * (1 - step / 4) ** 2 + 1e-7 for step in range(1, 5)])])
def test_schedule_options_shape_the_learning_rate(run_cli, color_folder, tiny_unet, tmp_path, schedule, option, rates):
    """diffusers' other training scripts' --lr_num_cycles and --lr_power: without them, cosine_with_restarts was the
    plain cosine, and polynomial linear."""
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4", "--logging_steps",
                                            "1", "--lr_warmup_steps", "0", "--lr_scheduler", schedule, *option))
    assert code == 0, err
    logged = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(rates, abs=1e-9)


def test_overwrite_output_dir_beside_a_resume_is_said_to_be_ignored(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "2")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                           "--overwrite_output_dir")  # it resumed without a word about the flag
    assert code == 0 and "--overwrite_output_dir is ignored: --resume_from_checkpoint latest goes on from " \
                         "checkpoint-2" in err, err
    assert metric_steps(out) == [1, 2, 3]


def test_overwrite_output_dir_starts_afresh(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "4")[0] == 0
    favourite = (out / "samples" / "step-0000004.png").read_bytes()
    (out / "samples" / "favourite.png").write_bytes(favourite)  # the user's, kept (it went with the earlier run)
    code, _, err = run_cli(*args, "--max_train_steps", "2", "--overwrite_output_dir")
    assert code == 0, err
    assert checkpoints(out) == {"checkpoint-2"} and metric_steps(out) == [1, 2]
    assert not (out / ".replaced-run").exists() and "removed the earlier run set aside" in err
    assert "2 sample grids from samples/" in err
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["favourite.png", "step-0000002.png"]
    assert (out / "samples" / "favourite.png").read_bytes() == favourite


def a_run_and_a_folder_of_broken_images(run_cli, color_folder: Path, tiny_unet: Path, tmp_path: Path
                                        ) -> tuple[Path, Path, list, bytes]:
    """A 2-step run with its checkpoint, and a folder whose one image cannot be read (a replacement run fails on
    it before it saves). Returns the run's folder, the broken folder, the run's flags and its UNet weights."""
    out, broken = tmp_path / "run", tmp_path / "broken"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    assert run_cli(*args)[0] == 0
    weights = (out / "unet" / WEIGHTS).read_bytes()
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    return out, broken, args, weights


def test_overwrite_output_dir_keeps_the_earlier_run_until_the_new_one_saves(run_cli, color_folder, tiny_unet,
                                                                            tmp_path):
    """It removed the earlier run at once: a new run failing on its images left neither model. Then it left the
    earlier run set aside, and re-running the earlier command started afresh and deleted it."""
    out, broken, args, weights = a_run_and_a_folder_of_broken_images(run_cli, color_folder, tiny_unet, tmp_path)
    code, _, err = run_cli(*fast_train_args(broken, tiny_unet, out, "--overwrite_output_dir"))
    assert code != 0 and "could be read" in err, err
    assert "this run ended before saving anything, so the earlier run it set aside is back" in err
    assert (out / "unet" / WEIGHTS).read_bytes() == weights and not (out / ".replaced-run").exists()
    assert json.loads((out / "training_config.json").read_text())["train_data_dir"] == str(color_folder)
    code, _, err = run_cli(*args, "--max_train_steps", "4")  # the earlier command, extended, goes on
    assert code == 0 and "resuming from checkpoint-2" in err, err
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}


def test_a_replacement_killed_before_it_saved_leaves_the_earlier_run_to_keep_or_replace(run_cli, color_folder,
                                                                                        tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2")
    assert run_cli(*args)[0] == 0
    run_folder.set_aside_previous_run(out, "logs")  # as an --overwrite_output_dir run killed by SIGKILL leaves it
    code, _, err = run_cli(*args)
    one_line_error(code, err, f"--output_dir {out}: an --overwrite_output_dir run was killed before it saved")
    assert (out / ".replaced-run" / "unet" / WEIGHTS).is_file()
    code, _, err = run_cli(*args, "--overwrite_output_dir", "--seed", "1")
    assert code == 0 and not (out / ".replaced-run").exists(), err


def test_a_replacement_killed_while_setting_aside_leaves_the_earlier_run_whole(run_cli, color_folder, tiny_unet,
                                                                                 tmp_path, monkeypatch):
    """Killed between the renames that set the earlier run aside, it left its checkpoint in .replaced-run and its
    pipeline in place; the next --overwrite_output_dir run took the pipeline for the killed run's and removed it,
    so that run failing on its images put back a run without its model."""
    out, broken, args, weights = a_run_and_a_folder_of_broken_images(run_cli, color_folder, tiny_unet, tmp_path)
    real_rename = Path.rename

    def set_aside_killed_after_the_checkpoint() -> None:
        def rename(path, target):
            if any(out.glob(".replac*/checkpoint-2")):
                raise SystemExit("killed")  # as SIGKILL: nothing after it runs
            return real_rename(path, target)
        with monkeypatch.context() as patched:
            patched.setattr(Path, "rename", rename)
            with pytest.raises(SystemExit):
                run_folder.set_aside_previous_run(out, "logs")
        assert (out / "unet").is_dir() and not (out / "checkpoint-2").exists()  # half set aside

    set_aside_killed_after_the_checkpoint()
    code, _, err = run_cli(*fast_train_args(broken, tiny_unet, out, "--overwrite_output_dir"))
    assert code != 0 and (out / "unet" / WEIGHTS).is_file(), err
    assert (out / "unet" / WEIGHTS).read_bytes() == weights and checkpoints(out) == {"checkpoint-2"}
    assert "a run stopped while it set the earlier run aside had moved part of it" in err, err
    set_aside_killed_after_the_checkpoint()
    code, _, err = run_cli(*args, "--max_train_steps", "4")  # the earlier command, extended, goes on
    assert code == 0 and "resuming from checkpoint-2" in err, err
    assert not any(out.glob(".replac*"))
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4"}


def test_the_processes_of_a_launch_put_a_half_set_aside_run_back_in_turn(tmp_path):
    """Every process of a launch plans at once: one that found the folder locked by another (putting the earlier
    run back, for milliseconds) was refused as if the folder were another run's."""
    out = tmp_path / "run"
    (out / run_folder.SETTING_ASIDE_DIR / "checkpoint-2").mkdir(parents=True)
    holder = subprocess.Popen(  # another process of the launch, holding the lock a moment
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(1)", str(out / run_folder.LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "put back into" in run_folder.put_back_interrupted_set_aside(out)
    finally:
        holder.communicate()
    assert (out / "checkpoint-2").is_dir() and not (out / run_folder.SETTING_ASIDE_DIR).exists()
    assert run_folder.put_back_interrupted_set_aside(out) == ""  # nothing left to put back


def test_overwrite_output_dir_keeps_a_logging_dir_outside_the_output(run_cli, color_folder, tiny_unet, tmp_path):
    shared_logs = tmp_path / "tensorboard"
    (shared_logs / "other-run").mkdir(parents=True)
    (shared_logs / "other-run" / "events.out").write_text("another run's log")
    for logging_dir in (str(shared_logs), "../tensorboard"):
        args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1",
                               "--logging_dir", logging_dir, "--overwrite_output_dir")
        assert run_cli(*args)[0] == 0
        assert run_cli(*args)[0] == 0
        assert (shared_logs / "other-run" / "events.out").read_text() == "another run's log"


# ---------------------------------------------------------------------------------------- bad input


def one_line_error(code: int, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


@pytest.mark.parametrize("make_args, expected", [
    (lambda d, u, o: ["train", "--output_dir", o], "no dataset given"),
    (lambda d, u, o: ["train", "--dry_run"], "--demo gives its settings to a command with flags (--demo --dry_run)"),
    (lambda d, u, o: fast_train_args(d / "missing", u, o), "no such folder"),
    (lambda d, u, o: fast_train_args(next(p for p in d.rglob("*") if p.is_file()), u, o), "is a file; pass the "
                                                                                       "folder that holds the images"),
    (lambda d, u, o: fast_train_args(d, u, o, "--resolution", "100", "--model_config_name_or_path", "",
                                     "--model_preset", "seed"),
     "--resolution 100 is not divisible by 32 (the model halves it 5 times); use 96 or 128"),
    (lambda d, u, o: fast_train_args(d, u, o, "--resolution", "15"), "--resolution 15 is not divisible by 2"),
    (lambda d, u, o: fast_train_args(d, u, o, "--resume_from_checkpoint", "checkpoint-99"),
     "--resume_from_checkpoint checkpoint-99: no such checkpoint"),
    (lambda d, u, o: fast_train_args(d, u, o, "--sampler", "plms"), "--sampler plms: unknown"),
    (lambda d, u, o: fast_train_args(d, u, d), "--train_data_dir and --output_dir are both"),
    (lambda d, u, o: fast_train_args(d, u, o, "--prediction_type", "sample", "--sampler", "euler-ancestral"),
     "--sampler euler-ancestral cannot sample this model"),  # it failed at the first preview
    (lambda d, u, o: fast_train_args(d, u, o, "--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "1000"),
     "1000 sampling steps with ddpm: the model was trained with 100 timesteps; use at most 100 steps "
     "(--ddpm_num_inference_steps)"),
    (lambda d, u, o: fast_train_args(d, u, o, "--model_preset", "huge", "--model_config_name_or_path", ""),
     "--model_preset huge: unknown"),
    (lambda d, u, o: fast_train_args(d, u, o, "--num_channels", "1"), "--num_channels 1 contradicts"),
    (lambda d, u, o: fast_train_args(d, write_unet_config(o.parent / "four", in_channels=4, out_channels=4), o),
     "in_channels 4 and out_channels 4; uncond trains on grayscale (1) or RGB (3) images"),
])
def test_bad_input_is_one_line_before_any_work(run_cli, color_folder, tiny_unet, tmp_path, make_args, expected):
    out = tmp_path / "never"
    code, _, err = run_cli(*make_args(color_folder, tiny_unet, out))
    one_line_error(code, err, expected)
    assert not (out / "unet").exists() and not list(out.glob("checkpoint-*")) if out.exists() else True


def test_a_local_rank_left_in_the_environment_is_named_not_mixed_precision(run_cli, color_folder, tiny_unet, tmp_path,
                                                                            monkeypatch):
    """LOCAL_RANK without a launcher's RANK: accelerate's rendezvous error came out as
    "--mixed_precision no: Error initializing torch.distributed ...", a flag nobody passed (trial 63 F4)."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1"))
    one_line_error(code, err, "cannot join the processes of a launch (")
    assert "unset LOCAL_RANK to train in one process" in err and "--mixed_precision" not in err


def test_names_that_are_no_utf8_train_and_an_output_folder_of_one_is_refused_at_once(run_cli, color_folder, tiny_unet,
                                                                                       tmp_path):
    """A file or folder named in Latin-1 (an old zip's) is bytes that are no UTF-8: one among the images stopped the
    run with a traceback; a data folder so named crashed the model card's write after training, leaving an empty
    README.md that barred the resume; and safetensors cannot read weights under such a folder, so a run trained
    into one could not be resumed, sampled or exported (trial 64 F2)."""
    images = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9s|x"))  # (and a `|`, which split the card's table row)
    shutil.copytree(color_folder, images)
    (images / "image_002.png").rename(images / os.fsdecode(b"\xe9t\xe9.png"))
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(images, tiny_unet, out, "--max_train_steps", "1"))
    assert code == 0, err
    assert "| dataset | images from caf\ufffds\\|x |" in (out / "README.md").read_text()
    latin = Path(os.fsdecode(bytes(tmp_path) + b"/r\xe9sultat"))
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, latin))
    one_line_error(code, err, f"--output_dir {tmp_path}/r\\xe9sultat: its path is not UTF-8")
    assert not latin.exists()


def test_the_card_names_the_image_folder_given_as_dot(tmp_path, monkeypatch):
    """`--train_data_dir .` gave the card "images from " (trial 64 F6)."""
    from uncond.config import TrainConfig
    from uncond.outputs import data_description

    (tmp_path / "cats").mkdir()
    monkeypatch.chdir(tmp_path / "cats")
    assert [data_description(TrainConfig(train_data_dir=name)) for name in (".", "./", "../cats")] == \
        ["images from cats"] * 3


def write_unet_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**TINY_UNET, **changes}))
    return folder / "config.json"


def test_a_model_config_from_another_diffusers_version_trains(run_cli, color_folder, tmp_path):
    """Settings this diffusers version's UNet2DModel lacks are dropped with a warning, as from_config does."""
    config = write_unet_config(tmp_path / "newer", attention_backend="flash", _diffusers_version="9.0.0")
    code, _, err = run_cli(*fast_train_args(color_folder, config, tmp_path / "run", "--max_train_steps", "1"))
    assert code == 0, err
    assert "ignoring attention_backend, which this diffusers version's UNet2DModel does not take" in err


def test_unknown_choice_exits_2_with_one_line(run_cli, color_folder, tiny_unet, tmp_path, capsys):
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "x", "--prediction_type", "noise"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "invalid choice: 'noise'" in err and "v_prediction" in err


@pytest.mark.parametrize("extra, expected", [
    (("--logger", "wandb"), "--logger wandb needs the wandb package"),
    (("--enable_xformers_memory_efficient_attention",), "needs xformers"),
    (("--model_config_name_or_path", "someone/some-unet"), "could not load a UNet config from the Hub"),
    (("--train_data_dir", "", "--dataset_name", "someone/some-dataset"), "--dataset_name someone/some-dataset: "
                                                                         "could not load it"),
])
def test_missing_packages_and_offline_hub_fail_early(run_cli, color_folder, tiny_unet, tmp_path, extra, expected):
    pytest.importorskip("tensorboard")
    if "wandb" in extra and __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "out"), *extra)
    one_line_error(code, err, expected)


def test_push_to_hub_offline_fails_before_training_and_hides_the_token(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--push_to_hub",
                                                 "--hub_token", "hf_do_not_show_me"))
    one_line_error(code, err, "--push_to_hub: cannot create the Hub repository")
    assert "hf_do_not_show_me" not in stdout + err
    assert not out.exists()  # nothing is written before the Hub has answered (it left logs/ and its settings)


def test_folder_without_readable_images(run_cli, tiny_unet, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_text("not a png")
    (folder / "b.jpg").write_bytes(b"")
    code, _, err = run_cli(*fast_train_args(folder, tiny_unet, tmp_path / "out" / "run"))
    one_line_error(code, err, "none of the 2 images")
    # the folders it made are gone (they held an empty TensorBoard run and the settings of no model)
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()  # a folder above that was there stays, and so does an empty output folder
    (tmp_path / "empty").mkdir()
    for out in tmp_path / "mine" / "a" / "run", tmp_path / "empty":
        one_line_error(*run_cli(*fast_train_args(folder, tiny_unet, out))[::2], "none of the 2 images")
    assert not any((tmp_path / "mine").iterdir()) and not any((tmp_path / "empty").iterdir())


def test_a_finished_run_is_kept_and_goes_on_with_a_larger_max_train_steps(run_cli, color_folder, tiny_unet,
                                                                          tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "100")
    assert run_cli(*args, "--max_train_steps", "1")[0] == 0
    assert (out / "checkpoint-1").is_dir()  # the end is a checkpoint, though not a multiple of 100
    from uncond.version import uncond_version  # which uncond wrote it: every commit is version 0.1.0

    assert json.loads((out / "checkpoint-1" / "training_state.json").read_text())["uncond_version"] == uncond_version()
    assert not (out / "logs").exists()  # --logger none: no empty logs/ in the pipeline folder
    before, settings = (out / "unet" / WEIGHTS).read_bytes(), (out / "training_config.json").read_text()
    code, _, err = run_cli(*args, "--max_train_steps", "1")  # the same command again: nothing to do
    assert code == 0 and "is complete at step 1" in err and (out / "unet" / WEIGHTS).read_bytes() == before
    assert "resuming" not in err  # it said it resumed, then that there was nothing to do
    code, _, err = run_cli(*args, "--max_train_steps", "1", "--dry_run")
    assert code == 0 and "is complete at step 1" in err and "resuming" not in err, err
    code, _, err = run_cli(*args, "--max_train_steps", "1", "--learning_rate", "5e-3")  # settings no step took
    assert code == 0 and "is complete at step 1" in err and (out / "training_config.json").read_text() == settings
    code, _, err = run_cli(*args, "--max_train_steps", "3")
    assert code == 0 and "resuming from checkpoint-1 at step 1" in err and metric_steps(out) == [1, 3]
    for path in out.glob("checkpoint-*"):  # a trained model without checkpoints is never overwritten
        __import__("shutil").rmtree(path)
    before = (out / "unet" / WEIGHTS).read_bytes()
    code, _, err = run_cli(*args, "--max_train_steps", "4")
    one_line_error(code, err, "already holds a trained model; pass --overwrite_output_dir")
    assert (out / "unet" / WEIGHTS).read_bytes() == before


def test_resume_latest_on_an_empty_folder_starts_a_new_run(run_cli, color_folder, tiny_unet, tmp_path):
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1",
                                            "--resume_from_checkpoint", "latest"))
    assert code == 0 and "no checkpoint in" in err and "starting a new run" in err


def test_resuming_with_another_model_is_refused(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2",
                                    "--checkpointing_steps", "2"))[0] == 0
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4",
                                            "--resolution", "8"))
    one_line_error(code, err, "it was trained with other settings (resolution: 16 -> 8; sample_size: 16 -> 8)")
    assert "decoding" not in err  # refused before the data is touched
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4",
                                            "--prediction_type", "v_prediction"))
    one_line_error(code, err, "prediction_type: epsilon -> v_prediction")
    assert err.rstrip().endswith("use the same ones, or --overwrite_output_dir to start afresh")
    # a checkpoint named from another folder: starting afresh there is not the way, leaving the flag out is
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "new", "--resolution", "8",
                                            "--resume_from_checkpoint", out / "checkpoint-2"))
    assert err.rstrip().endswith("use the same ones, or leave --resume_from_checkpoint out to start a new run")
    # ... and where --output_dir has checkpoints of its own, leaving the flag out goes on from those
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--resolution", "8",
                                            "--resume_from_checkpoint", out / "checkpoint-2"))
    assert err.rstrip().endswith("leave --resume_from_checkpoint out and pass --overwrite_output_dir to start a new "
                                 "run")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--resume_from_checkpoint", "checkpoint-9"))
    one_line_error(code, err, "--resume_from_checkpoint checkpoint-9: no such checkpoint (in "
                              f"{out}: checkpoint-2); use `latest` (or leave the flag out) to go on from the newest, "
                              "or --overwrite_output_dir to start afresh")
    monkeypatch.chdir(tmp_path)
    for given in (out, "run"):  # the run's folder for its checkpoint
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "new",
                                                "--resume_from_checkpoint", given))
        one_line_error(code, err, f"--resume_from_checkpoint {given} is a run's output folder, not one of its "
                                  "checkpoints (checkpoint-2); pass")


def test_resuming_with_another_channel_count_is_refused(run_cli, gray_folder, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--train_data_dir", gray_folder, "--model_preset", "tiny", "--output_dir", out,
            "--train_batch_size", "4", "--sample_steps", "2", "--logger", "none", "--checkpointing_steps", "2"]
    assert run_cli(*args, "--max_train_steps", "2")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "4", "--num_channels", "3")
    one_line_error(code, err, "in_channels: 1 -> 3")


def test_a_one_channel_model_config_on_colour_images_says_the_colour_goes(run_cli, color_folder, tmp_path):
    """A config copied from an MNIST model (in_channels 1) trained colour images as grayscale without a word."""
    gray_unet = tmp_path / "gray_unet.json"
    gray_unet.write_text(json.dumps({**TINY_UNET, "in_channels": 1, "out_channels": 1}))
    code, _, err = run_cli(*fast_train_args(color_folder, gray_unet, tmp_path / "run", "--max_train_steps", "1"))
    assert code == 0, err
    assert f"--model_config_name_or_path {gray_unet} has in_channels 1: the colour images are trained as " \
           "grayscale" in err


def test_a_three_channel_model_config_on_grayscale_images_says_so(run_cli, gray_folder, tiny_unet, tmp_path):
    """A colour model's config on a grayscale set trained RGB copies of it without a word."""
    code, _, err = run_cli(*fast_train_args(gray_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1"))
    assert code == 0, err
    assert f"--model_config_name_or_path {tiny_unet} has in_channels 3: the grayscale images are trained as RGB " \
           "with three equal channels; a config with in_channels 1" in err


# ---------------------------------------------------------------------------------------- entry points


def test_output_piped_into_head_ends_quietly():
    """`uncond presets | head -1` ended in a BrokenPipeError traceback."""
    import shlex

    piped = subprocess.run(f"{shlex.quote(sys.executable)} -m uncond presets | head -1", shell=True,
                           capture_output=True, text=True)
    assert piped.stdout.startswith("preset") and "Traceback" not in piped.stderr, piped.stderr


def test_console_command_and_module_run(tmp_path):
    presets = subprocess.run([sys.executable, "-m", "uncond", "presets"], capture_output=True, text=True, check=True)
    assert "tiny" in presets.stdout and "seed" in presets.stdout
    scripts = Path(sys.executable).parent
    help_text = subprocess.run([str(scripts / "uncond"), "train", "--help"], capture_output=True, text=True,
                               check=True).stdout
    for flag in ("--dataset_name", "--ddpm_num_inference_steps", "--checkpoints_total_limit", "--model_preset"):
        assert flag in help_text


@pytest.mark.slow
def test_two_processes_decode_once_and_train(tiny_unet, tmp_path):
    """`accelerate launch` with 2 CPU processes: rank 0 decodes into the cache while rank 1 waits, then maps it."""
    folder = write_images(tmp_path / "images", 12)
    counting = tmp_path / "counting_uncond.py"  # uncond's CLI with decode_image counted per process
    counting.write_text(
        "import os, sys\nfrom uncond import cli, decoding\ndecode = decoding.decode_image\n"
        "def counted(*args):\n"
        "    with open(os.path.join(sys.argv[-1], f\"decodes-{os.environ['RANK']}.txt\"), 'a') as f:\n"
        "        f.write('1')\n"
        "    return decode(*args)\n"
        "decoding.decode_image = counted\nsys.exit(cli.console(sys.argv[1:-1]))\n")
    out = tmp_path / "run"
    args = fast_train_args(folder, tiny_unet, out, "--max_train_steps", "2")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             str(counting), *map(str, args), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "decodes-0.txt").read_text() == "1" * 12 and not (tmp_path / "decodes-1.txt").exists()
    assert "2 processes" in result.stderr and (out / "unet").is_dir()


def test_num_epochs_count_the_whole_run_when_a_resume_changes_the_batch(run_cli, color_folder, tiny_unet, tmp_path):
    """12 images: one epoch at batch 2 (6 steps), then two more at batch 4 (3 steps each): 3 epochs, 36 images,
    and the cosine schedule ends at zero on the last step."""
    out = tmp_path / "run"
    common = ("--checkpointing_steps", "6", "--logging_steps", "1", "--lr_scheduler", "cosine")
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, *common, "--train_batch_size", "2",
                                    "--num_epochs", "1"))[0] == 0
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *common, "--train_batch_size", "4",
                                            "--num_epochs", "3"))
    assert code == 0, err
    assert "global batch of 2; going on with 1 process and a global batch of 4" in err
    state = json.loads((out / "training_state.json").read_text())
    assert (state["step"], state["epoch"], state["images_seen"]) == (12, 2, 36)
    assert metric_steps(out) == list(range(1, 13))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 0.0


def test_a_resume_with_another_batch_says_which_images_it_trains_on_again():
    """Steps cover the start of each epoch's order: 6 images seen at batch 2, then whole steps of 4 go on after 4
    of them, and the note said training went on after all 6."""
    from uncond.plan import position_after

    state = {"epoch": 0, "epoch_start_step": 0, "num_processes": 1, "global_batch_size": 2}
    position = position_after(3, state, steps_per_epoch=3, global_batch_size=4, num_processes=1)
    assert (position.step, position.epoch_offset) == (3, 2)  # one step of 4 into the epoch: 4 images
    assert position.note.endswith("after the 6 images already seen in epoch 0 (in whole steps of 4: the last 2 "
                                  "images of those are trained on again)")
    position = position_after(3, state, steps_per_epoch=4, global_batch_size=3, num_processes=1)
    assert position.epoch_offset == 1 and position.note.endswith("after the 6 images already seen in epoch 0")


def test_a_resume_on_changed_data_at_an_epoch_boundary_goes_on_with_that_epoch():
    """A checkpoint written as an epoch ended (none of the next one seen) goes on at the next epoch's start; the
    changed data must not make it skip that epoch too."""
    from uncond.plan import position_after

    state = {"epoch": 2, "epoch_start_step": 6, "num_images": 10, "images_key": "then"}
    at_a_boundary = position_after(6, state, steps_per_epoch=3, global_batch_size=4, num_processes=1,
                                   images=(12, "now"))
    mid_epoch = position_after(7, state, steps_per_epoch=3, global_batch_size=4, num_processes=1, images=(12, "now"))
    assert (at_a_boundary.epoch, at_a_boundary.epoch_offset) == (2, 0)
    assert (mid_epoch.epoch, mid_epoch.epoch_offset) == (3, -2)  # epoch 3 starts at step 7, not 9
    assert "going on from the start of epoch 2" in at_a_boundary.note


def test_a_resume_on_changed_data_goes_on_from_the_next_epoch_and_says_so(run_cli, color_folder, tiny_unet,
                                                                          tmp_path):
    """12 images at batch 4 (3 steps an epoch), stopped 2 steps into epoch 1; then 8 images removed from the folder.
    The checkpoint's place in its epoch means nothing over 4 images: the run goes on at the start of epoch 2 (one
    step an epoch) and says so, where it skipped to epoch 3 without a word."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "5", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "5")[0] == 0
    for path in sorted(path for path in color_folder.rglob("*") if path.is_file())[4:]:
        path.unlink()
    code, _, err = run_cli(*args, "--max_train_steps", "8")
    assert code == 0, err
    assert ("the data changed since checkpoint-5 (12 images then, 4 now): going on from the start of epoch 2, in "
            "the new images' order") in err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 0, 0, 1, 1, 2, 3, 4]
    first = sorted(path for path in color_folder.rglob("*") if path.is_file())[0]
    first.rename(first.with_name("renamed" + first.suffix))  # as many images, other files: said, order kept
    code, _, err = run_cli(*args, "--max_train_steps", "9")
    assert code == 0, err
    assert "the image files changed since checkpoint-8, as many as then (replaced, or copied anew)" in err


def test_the_model_files_are_as_readable_as_the_umask_allows(run_cli, color_folder, tiny_unet, tmp_path):
    """safetensors writes its files private (0600): others on a shared machine could not load the model."""
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2",
                                        "--checkpointing_steps", "2", "--use_ema"))[0] == 0
    finally:
        os.umask(previous)
    modes = {str(path.relative_to(out)): oct(path.stat().st_mode & 0o777) for path in out.rglob("*") if path.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in modes
    assert "checkpoint-2/unet_ema/diffusion_pytorch_model.safetensors" in modes
    assert {mode for name, mode in modes.items() if not name.startswith(".")} == {"0o644"}, modes


def test_runs_logging_into_one_shared_folder_keep_their_curves_apart(run_cli, color_folder, tiny_unet, tmp_path):
    """A job array's runs with one absolute --logging_dir all wrote into its uncond/ run: one TensorBoard run whose
    curves zig-zagged between theirs."""
    shared = tmp_path / "all-runs-tb"
    for name in ("cats-a", "cats-b"):
        assert run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / name, "--max_train_steps", "2",
                                        "--logging_steps", "1", "--logger", "tensorboard", "--logging_dir",
                                        shared))[0] == 0
    for name in ("cats-a", "cats-b"):
        events = EventAccumulator(str(shared / name / "uncond"), size_guidance={"scalars": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert not (shared / "uncond").exists()


def test_tensorboard_curves_go_on_from_the_checkpoint_resumed(run_cli, color_folder, tiny_unet, tmp_path):
    """Taken back to checkpoint-4 after step 8: TensorBoard showed steps 1-8 and then 5-6 again, a curve doubling
    back, where metrics.jsonl drops the abandoned steps."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "4", "--logging_steps", "1",
                           "--logger", "tensorboard")
    assert run_cli(*args, "--max_train_steps", "8")[0] == 0
    assert run_cli(*args, "--max_train_steps", "6", "--resume_from_checkpoint", "checkpoint-4")[0] == 0
    events = EventAccumulator(str(out / "logs" / "uncond"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == metric_steps(out) == [1, 2, 3, 4, 5, 6]


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(run_cli, color_folder, tiny_unet, tmp_path):
    """Taking a run back (after its loss diverged, say): the later checkpoints of the abandoned continuation were
    taken for the new run's, and the rotation, which keeps the highest steps, removed each new checkpoint."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "8")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "6", "--resume_from_checkpoint", "checkpoint-4",
                           "--checkpoints_total_limit", "1")
    assert code == 0, err
    aside = out / "abandoned-after-step-4"
    assert f"checkpoint-6, checkpoint-8, of the run's later steps, moved to {aside} with their 1 sample grid and " \
           "metrics" in err
    assert checkpoints(out) == {"checkpoint-6"} and checkpoints(aside) == {"checkpoint-6", "checkpoint-8"}
    # the abandoned steps' grids go with them (step 8's stayed beside the new run's, as if it were its own)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert sorted(p.name for p in (aside / "samples").iterdir()) == ["step-0000008.png"]  # the first run's last
    assert metric_steps(aside) == [5, 6, 7, 8] and metric_steps(out) == [1, 2, 3, 4, 5, 6]  # they were lost
    # going on with the abandoned branch in this folder would mix the two (its checkpoint-8 beside this
    # branch's checkpoint-6, the metrics of both): it goes on in another folder
    code, _, err = run_cli(*args, "--max_train_steps", "10", "--resume_from_checkpoint", aside / "checkpoint-8")
    one_line_error(code, err, "is of a branch that")
    assert "pass another --output_dir to go on with it" in err and checkpoints(out) == {"checkpoint-6"}
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "branch", "--max_train_steps", "10",
                                            "--resume_from_checkpoint", aside / "checkpoint-8"))
    assert code == 0 and checkpoints(tmp_path / "branch") == {"checkpoint-10"}, err
    code, _, err = run_cli(*args, "--max_train_steps", "8")  # the same command goes on from this run's newest
    assert code == 0 and "resuming from checkpoint-6 at step 6" in err, err


def test_a_resume_takes_this_runs_learning_rate_and_ema_settings(run_cli, color_folder, tiny_unet, tmp_path,
                                                                 monkeypatch):
    """A diverged run is resumed with a lower --learning_rate: its very first step must use it (the optimizer
    kept the checkpoint's), and --ema_max_decay given on resume counts too (EMAModel kept the checkpoint's)."""
    from uncond import train

    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                           "--checkpointing_steps", "2", "--logging_steps", "1", "--use_ema")
    assert run_cli(*args, "--max_train_steps", "2", "--learning_rate", "1e-4", "--ema_max_decay", "0.5")[0] == 0
    rates, train_step = {}, train.train_step

    def recording(run, micro_batches):
        group = run.optimizer.param_groups[0]
        rates[run.step + 1] = (group["lr"], group["weight_decay"], group["betas"])
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "train_step", recording)
    code, _, err = run_cli(*args, "--max_train_steps", "4", "--learning_rate", "1e-2", "--ema_max_decay", "0.9",
                           "--adam_weight_decay", "0.5", "--adam_beta2", "0.9")
    assert code == 0, err
    assert rates == {3: (1e-2, 0.5, (0.95, 0.9)), 4: (1e-2, 0.5, (0.95, 0.9))}  # the checkpoint's were 1e-6, 0.999
    assert "checkpoint-2's run had other settings; this run's apply from its next step: learning_rate 0.0001 -> " \
           "0.01, adam_beta2 0.999 -> 0.9, adam_weight_decay 1e-06 -> 0.5, ema_max_decay 0.5 -> 0.9" in err
    decays = {r["step"]: r["ema_decay"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert decays[2] <= 0.5 < decays[4] <= 0.9  # the warmup goes on, up to the new cap


def test_the_logged_ema_decay_is_per_step_whatever_the_update_interval():
    """--ema_update_every 4 logged an update's decay, d^4 (0.99958 where a run updating every step logs 0.99989
    at the same step): runs with other intervals could not be compared."""
    from uncond import models

    weights = [torch.nn.Parameter(torch.zeros(1))]
    every_step, every_fourth = (models.EMA(weights, every=every, use_ema_warmup=True) for every in (1, 4))
    for _ in range(400):
        every_step.step(weights)
    for _ in range(100):
        every_fourth.step(weights)
    assert every_fourth.decay_per_step == pytest.approx(every_step.decay_per_step, rel=1e-6)
    assert every_fourth.cur_decay_value < every_step.cur_decay_value  # what was logged


def test_a_run_failing_in_a_notebook_lets_go_of_its_output_folder(run_cli, color_folder, tiny_unet, tmp_path,
                                                                    monkeypatch):
    """A run that failed in a Python process that lives on (a notebook's kernel) kept its folder locked: a run
    of it started from a terminal was refused as "in use by another uncond run" until the kernel ended."""
    import fcntl

    from uncond import train

    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "1")
    assert run_cli(*args, "--max_train_steps", "1")[0] == 0

    def failing(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(train, "run_training", failing)
    with pytest.raises(RuntimeError):
        run_cli(*args, "--max_train_steps", "2")
    with open(out / run_folder.LOCK_FILE, "a") as lock:  # as another process takes it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the failed run still holds it


def test_a_run_in_python_leaves_the_random_generators_and_memory_as_they_were(run_cli, color_folder, tiny_unet,
                                                                              tmp_path, monkeypatch):
    """A notebook's own draws after a run followed the run's seed; on a GPU its own float32 products ran in TF32
    after a run. And a run asks glibc to keep freed buffers (faster CPU steps); a notebook that trained, then
    freed a large array, kept its memory until the kernel ended (400 MiB freed: resident memory stayed 500 MiB
    higher)."""
    import random

    from uncond import environment, parts

    tune_cuda = parts.tune_cuda  # what a run on a GPU sets (the settings themselves need no GPU)
    monkeypatch.setattr(parts, "tune_cuda", lambda config, device: tune_cuda(config, torch.device("cuda")))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
    precision = torch.get_float32_matmul_precision()
    assert run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1"))[0] == 0
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and (drawn[1] == expected[1]).all() and drawn[2] == expected[2]
    assert torch.get_float32_matmul_precision() == precision == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
    if environment.glibc() is None:
        pytest.skip("glibc's allocator only")

    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = resident_bytes()
    array = np.ones(400 << 20, dtype=np.uint8)
    del array
    assert resident_bytes() - before < 100 << 20


def test_accumulation_says_how_its_schedule_differs_from_the_seed_scripts(run_cli, color_folder, tiny_unet,
                                                                          tmp_path):
    """With accumulation, train_unconditional.py's warmup lasted that many times longer and its schedule stopped
    part-way; uncond's counts optimizer steps, which a user reproducing a seed run could not tell (trial 51 F3)."""
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--dry_run")
    code, _, err = run_cli(*args, "--gradient_accumulation_steps", "3")
    assert code == 0 and "--gradient_accumulation_steps 3: --lr_warmup_steps and the cosine learning-rate schedule " \
        "count optimizer steps; train_unconditional.py counted micro-batches, so its warmup lasted 3 times as many " \
        "steps and its schedule was 1/3 of its way through at the run's end" in err, err
    # said only where it differs: not with a constant rate, a warmup of 0, or step rules counted in steps (trial 53 F5)
    for other in (("--gradient_accumulation_steps", "1"),
                  ("--gradient_accumulation_steps", "3", "--lr_scheduler", "constant"),
                  ("--gradient_accumulation_steps", "3", "--lr_scheduler", "constant_with_warmup",
                   "--lr_warmup_steps", "0"),
                  ("--gradient_accumulation_steps", "3", "--lr_scheduler", "piecewise_constant",
                   "--lr_step_rules", "1:10,0.1")):
        code, _, err = run_cli(*args, *other)
        assert code == 0 and "train_unconditional.py counted" not in err, err
    # accelerate stepped the seed's schedule once per process: on 2 processes its warmup was as long as uncond's
    from uncond.config import TrainConfig
    from uncond.plan import seed_schedule_difference

    note = seed_schedule_difference(TrainConfig(gradient_accumulation_steps=2, lr_warmup_steps=500), processes=2)
    assert note.startswith("2 processes, --gradient_accumulation_steps 2:") and "warmup lasted" not in note
    assert note.endswith("so its schedule was 1/2 of its way through at the run's end"), note


def test_dry_run_counts_a_resumed_runs_steps_as_the_run_does(run_cli, color_folder, tiny_unet, tmp_path):
    """--dry_run before a resume with another batch size said "84 steps in all" where the run then trained to
    124 (the epochs before the resume had another length), and said nothing of a resume the run then refused."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2")
    assert run_cli(*args, "--max_train_steps", "4")[0] == 0  # 12 images, 3 steps of 4 an epoch: into epoch 1
    code, _, err = run_cli(*args, "--num_epochs", "2", "--train_batch_size", "2", "--dry_run")
    assert code == 0, err
    said = int(re.search(r"(\d+) steps in all", err).group(1))
    code, _, err = run_cli(*args, "--num_epochs", "2", "--train_batch_size", "2")
    assert code == 0, err
    assert json.loads((out / "training_state.json").read_text())["step"] == said == 8  # 4, then 4 of 2 images
    # 2 epochs of 6 steps would be 12: the log said so beside the 8
    assert "8 optimizer steps (6 per epoch, 2 epochs, epoch 1 ending at step 8: the steps before this resume had " \
           "another batch or other data)" in err
    code, _, err = run_cli(*args, "--num_epochs", "1", "--dry_run")
    one_line_error(code, err, "checkpoint-8 is at step 8, past this run's last step")


def test_a_run_ended_at_its_last_checkpoint_is_complete_with_that_steps_grid(run_cli, color_folder, tiny_unet,
                                                                             tmp_path, monkeypatch):
    """Ending a run early at its last checkpoint (--max_train_steps of that step) exported it but kept the longer
    run's record: training_config.json passed back with --config trained on towards the old end; and the model
    card showed an older grid than its export's step."""
    import signal

    from uncond import train

    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--save_images_epochs", "100", "--save_model_epochs", "100")
    train_step = train.train_step

    def stopped_in_step_5(run, micro_batches):
        if run.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "train_step", stopped_in_step_5)
    code, _, err = run_cli(*args, "--max_train_steps", "30")
    assert code == 143 and "stopped by SIGTERM at step 5" in err, err
    monkeypatch.setattr(train, "train_step", train_step)
    code, _, err = run_cli(*args, "--max_train_steps", "5")
    assert code == 0 and "exported the pipeline at step 5" in err, err
    assert json.loads((out / "training_config.json").read_text())["max_train_steps"] == 5
    card = (out / "README.md").read_text()
    assert "samples/step-0000005.png" in card
    assert "- steps 0 to 5 (with uncond " in card and "- ended at step 5 (with uncond " in card, card
    assert "steps 5 to 5" not in card
    code, _, err = run_cli("train", "--config", out / "training_config.json")
    assert code == 0 and "is complete at step 5" in err, err


def test_checkpoints_that_will_not_fit_on_the_disk_are_said_at_the_start(run_cli, color_folder, tiny_unet, tmp_path,
                                                                          monkeypatch):
    """A long run keeps every checkpoint without --checkpoints_total_limit (the seed's 64 px model over 39,000 steps:
    78 of 1.7 GiB) and met a full disk days in, with nothing said before."""
    from types import SimpleNamespace

    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=1536 << 10))  # 1.5 MiB free
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "4",
                           "--checkpointing_steps", "1")
    for extra in (["--dry_run"], []):
        code, _, err = run_cli(*args, *extra)
        assert code == 0 and re.search(r"--checkpointing_steps 1: the run writes 4 checkpoints of about \d+ KiB, "
                                       r"[\d.]+ MiB on the disk at once, more than the 1.5 MiB free on the disk of "
                                       r".*; pass --checkpoints_total_limit N to keep only the newest N", err), err
    code, _, err = run_cli(*args, "--checkpoints_total_limit", "1", "--overwrite_output_dir", "--dry_run")
    assert code == 0 and "checkpoints of about" not in err  # two at once (the next one before the oldest goes)


def test_extending_a_finished_run_says_its_learning_rate_goes_back_up(run_cli, color_folder, tiny_unet, tmp_path):
    """A finished cosine run, extended, goes on at the rate of the stretched schedule (0 at the old end, then
    higher): the loss curve jumped, with nothing said. A resume of the same length says nothing of it."""
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--checkpointing_steps", "2")
    assert run_cli(*args, "--max_train_steps", "4")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "4", "--dry_run")
    assert code == 0 and "is complete at step 4: nothing would be trained" in err and "now spans" not in err, err
    said = (r"--lr_scheduler cosine now spans the run's 8 steps: the learning rate at step 4 is (\d\.\d+e-05), where "
            r"checkpoint-4's run had 0\.00e\+00")
    code, _, err = run_cli(*args, "--max_train_steps", "8", "--dry_run")  # said before the run, the same
    assert code == 0 and re.search(said, err) and "nothing would be trained" not in err, err
    before = re.search(said, err).group(1)
    code, _, err = run_cli(*args, "--max_train_steps", "8", "--lr_scheduler", "constant", "--dry_run")
    assert code == 0 and "--lr_scheduler constant, where checkpoint-4's run had cosine: the learning rate at " \
                         "step 4 is 1.00e-04, where checkpoint-4's run had 0.00e+00" in err, err
    code, _, err = run_cli(*args, "--max_train_steps", "8")
    assert code == 0 and re.search(said, err) and re.search(said, err).group(1) == before, err
    shutil.rmtree(tmp_path / "run" / "checkpoint-8")
    code, _, err = run_cli(*args, "--max_train_steps", "8")
    assert code == 0 and "resuming from checkpoint-6" in err and "now spans" not in err, err
    code, _, err = run_cli(*args, "--max_train_steps", "8", "--dry_run")
    assert code == 0 and "now spans" not in err, err


def test_tensorboard_drops_the_steps_of_a_branch_left_behind(run_cli, color_folder, tiny_unet, tmp_path):
    """Going back to an earlier checkpoint moves the later checkpoints, grids and metrics.jsonl lines aside; the
    TensorBoard curve of the folder must not keep the left branch's steps beside the new ones."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logging_steps", "1",
                           "--logger", "tensorboard")
    assert run_cli(*args, "--max_train_steps", "6")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "5", "--resume_from_checkpoint", "checkpoint-2")
    assert code == 0 and "moved to" in err, err
    events = EventAccumulator(str(out / "logs" / "uncond"), size_guidance={"scalars": 0})  # as TensorBoard reads it
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4, 5]


def test_a_complete_run_run_again_with_other_settings_says_only_that_it_is_complete(run_cli, color_folder, tiny_unet,
                                                                                      tmp_path):
    """A finished run's command re-run with another batch and learning rate said that they applied from the next
    step and where in the epoch it went on, then that the run was complete: no step takes them."""
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--num_epochs", "2")
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args, "--learning_rate", "5e-4", "--train_batch_size", "2")
    assert code == 0 and "is complete at step 6" in err, err
    assert "apply from its next step" not in err and "going on with" not in err
    assert "-parameter UNet" not in err and "batch 2 per device" not in err  # no summary of a run not made
    code, _, err = run_cli(*args, "--learning_rate", "5e-4", "--num_epochs", "3")  # going on, they are said
    assert code == 0 and "this run's apply from its next step: learning_rate 0.0001 -> 0.0005" in err, err


def test_the_ema_clock_of_a_checkpoint_that_does_not_record_it(tmp_path):
    """Checkpoints of earlier uncond and of train_unconditional.py record no step of the EMA's last update or
    warmup start: their updates came at the multiples of their interval, their count on the warmup's clock."""
    saved = tmp_path / "checkpoint-7"  # 1 update of 4 steps, then 3 more steps
    saved.mkdir()
    (saved / "training_config.json").write_text(json.dumps({"ema_update_every": 4}))
    assert checkpoint.ema_clock(saved, 1, has_average=True) == (4, 0)  # a resume with 3 updates at 9: steps 5-9
    assert checkpoint.ema_clock(saved, 0, has_average=False) == (7, 7)  # a resume adding --use_ema: warmup anew
    (tmp_path / "checkpoint-36").mkdir()  # the seed script's, EMA added by a resume at step 30: 6 updates
    assert checkpoint.ema_clock(tmp_path / "checkpoint-36", 6, has_average=True) == (36, 30)


def test_a_resume_adding_use_ema_warms_a_new_average_up_from_its_step(run_cli, color_folder, tiny_unet, tmp_path):
    """A run without EMA resumed at step 6 with --use_ema: its EMA counted its last update in updates since the
    resume (1, 2, 3), so that exports right after an update blended in the trained weights by the decay of every
    step since step 1 (2.5 % EMA at step 36; trial 67 F1). Its first update takes the trained weights whole (the
    warmup starts anew, as train_unconditional.py's new EMAModel), each export is the EMA of its step."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "1", "--lr_scheduler", "constant")
    assert run_cli(*args, "--max_train_steps", "6")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "9", "--use_ema", "--resume_from_checkpoint", "latest")
    assert code == 0, err
    first_ema, first_trained = (load_file(out / "checkpoint-7" / name / WEIGHTS) for name in ("unet_ema", "unet"))
    assert all(torch.equal(first_ema[name], first_trained[name]) for name in first_trained)
    exported, averaged = load_file(out / "unet" / WEIGHTS), load_file(out / "checkpoint-9" / "unet_ema" / WEIGHTS)
    assert all(torch.equal(exported[name], averaged[name]) for name in averaged)
    state = json.loads((out / "checkpoint-9" / "training_state.json").read_text())
    assert (state["ema_share"], state["ema_last_update_step"], state["ema_clock_start_step"]) == (1.0, 9, 6)


def test_a_resume_with_another_ema_update_every_keeps_the_steps_since_the_last_update(run_cli, color_folder,
                                                                                      tiny_unet, tmp_path):
    """A run resumed with another --ema_update_every counted its next update's decay from its own interval's last
    multiple before the checkpoint (step 6 of 6 in 3s), not from the saved run's last update (step 4 in 4s): the
    steps between were dropped and the old average's share jumped (0.40 -> 0.61; trial 60 F6). Up to the next
    update, the resumed run's model is the one the saved run would have had: 6 steps in 4s, then 1 in 3s, exports
    what 7 steps in 4s export, as no update falls between."""
    whole = tmp_path / "whole"
    settings = ("--use_ema", "--ema_update_every", "4", "--lr_scheduler", "constant")  # (a schedule of its own)
    assert run_cli(*fast_train_args(color_folder, tiny_unet, whole, *settings, "--max_train_steps", "7"))[0] == 0
    resumed = tmp_path / "resumed"
    args = fast_train_args(color_folder, tiny_unet, resumed, *settings)
    assert run_cli(*args, "--max_train_steps", "6")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "7", "--ema_update_every", "3",
                           "--resume_from_checkpoint", "latest")
    assert code == 0, err
    trained, again = (load_file(run / "checkpoint-7" / "unet" / WEIGHTS) for run in (whole, resumed))
    assert all(torch.equal(again[name], trained[name]) for name in trained)
    expected, exported = load_file(whole / "unet" / WEIGHTS), load_file(resumed / "unet" / WEIGHTS)
    assert all(torch.equal(exported[name], expected[name]) for name in expected)
    state = json.loads((resumed / "checkpoint-7" / "training_state.json").read_text())
    assert state["ema_last_update_step"] == 4
    model = sampling.load_model(str(resumed / "checkpoint-7"), torch.device("cpu"), torch.float32)
    assert all(torch.equal(model.unet.state_dict()[name], expected[name]) for name in expected)


def test_an_ema_updated_every_two_steps_is_updated_at_the_second(run_cli, color_folder, tiny_unet, tmp_path):
    """With --ema_update_every 2 the EMA is updated after steps 2, 4, ...: it holds the last step's weights.
    Its first update keeps none of the random initial weights, as per-step updates keep none (it kept d^2 of
    them: a sixth)."""
    out = tmp_path / "run"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--use_ema",
                                    "--ema_update_every", "2", "--max_train_steps", "2"))[0] == 0
    ema = load_file(out / "checkpoint-2" / "unet_ema" / WEIGHTS)
    trained = load_file(out / "checkpoint-2" / "unet" / WEIGHTS)
    assert all(torch.equal(ema[name], trained[name]) for name in trained)
    assert json.loads((out / "checkpoint-2" / "unet_ema" / "config.json").read_text())["optimization_step"] == 1


def test_the_steps_an_ema_updated_every_n_has_not_averaged_yet_reach_the_export(run_cli, color_folder, tiny_unet,
                                                                                tmp_path):
    """A run of 3 steps with --ema_update_every 4 exported the EMA's random initial weights, and in general the
    last max_train_steps mod N steps never reached the export (trial 58 F2). The export blends them in as the next
    update would (here, as the first, all of the trained weights); the checkpoint keeps the EMA as it is."""
    out = tmp_path / "run"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--use_ema", "--ema_update_every", "4",
                                    "--max_train_steps", "3"))[0] == 0
    exported = load_file(out / "unet" / WEIGHTS)
    trained = load_file(out / "checkpoint-3" / "unet" / WEIGHTS)
    ema = load_file(out / "checkpoint-3" / "unet_ema" / WEIGHTS)
    assert all(torch.equal(exported[name], trained[name]) for name in trained)
    assert not all(torch.equal(ema[name], trained[name]) for name in trained)  # not updated yet: resumed exactly


def test_a_checkpoint_between_ema_updates_is_sampled_as_the_run_exports_its_step(run_cli, color_folder, tiny_unet,
                                                                                  tmp_path):
    """Sampling, evaluating or exporting a checkpoint (step 3, --ema_update_every 2: updated at step 2) took its
    unet_ema/ as it is, without step 3's weights, which the run's export of that step blends in as the update at
    step 3 would (with 3 steps of --ema_update_every 4: the random initial weights, trial 58 F2)."""
    out = tmp_path / "run"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--use_ema", "--ema_update_every", "2",
                                    "--max_train_steps", "3"))[0] == 0
    exported = load_file(out / "unet" / WEIGHTS)
    ema = load_file(out / "checkpoint-3" / "unet_ema" / WEIGHTS)
    assert not all(torch.equal(ema[name], exported[name]) for name in exported)
    for source in (out / "checkpoint-3", out / "checkpoint-3" / "unet_ema"):
        model = sampling.load_model(str(source), torch.device("cpu"), torch.float32)
        loaded = model.unet.state_dict()
        assert all(torch.equal(loaded[name], exported[name]) for name in exported), source
    trained = sampling.load_model(str(out / "checkpoint-3" / "unet"), torch.device("cpu"), torch.float32)
    assert not all(torch.equal(trained.unet.state_dict()[name], exported[name]) for name in exported)
    assert run_cli("export", out / "checkpoint-3", "--output_dir", tmp_path / "exported")[0] == 0
    again = load_file(tmp_path / "exported" / "unet" / WEIGHTS)
    assert all(torch.equal(again[name], exported[name]) for name in exported)
    assert "ema_share" not in json.loads((tmp_path / "exported" / "training_state.json").read_text())


def test_a_finished_run_whose_export_is_gone_exports_it_again(run_cli, color_folder, tiny_unet, tmp_path):
    """The same command run again after the pipeline was removed (moved away, a folder copied in part) said "the
    run ... is complete" and "done: the pipeline is in DIR", status 0, with no pipeline there (trial 57 F1); so
    did an export whose weights were emptied or cut short, or whose config was emptied (trial 58 F3)."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2", "--use_ema")
    assert run_cli(*args)[0] == 0
    exported = load_file(out / "unet" / WEIGHTS)
    weights = out / "unet" / WEIGHTS
    for damage in ("model_index.json", "unet", "scheduler", "emptied", "cut short", "config emptied"):
        if damage == "emptied":
            weights.write_bytes(b"")
        elif damage == "cut short":  # (trial 58 F3)
            weights.write_bytes(weights.read_bytes()[:-100])
        elif damage == "config emptied":
            (out / "unet" / "config.json").write_text("")
        else:
            shutil.rmtree(out / damage) if (out / damage).is_dir() else (out / damage).unlink()
        code, _, err = run_cli(*args, "--dry_run")  # it said the run was complete (trial 65 F6)
        assert code == 0 and "would end at once at step 2, exporting checkpoint-2" in err, (damage, err)
        code, _, err = run_cli(*args)
        assert code == 0 and "is complete at step 2" not in err, err
        again = load_file(out / "unet" / WEIGHTS)
        assert all(torch.equal(again[name], exported[name]) for name in exported)  # the EMA's, as before
        assert type(DiffusionPipeline.from_pretrained(out)).__name__ == "DDPMPipeline"
    assert "is complete at step 2" in run_cli(*args)[2]
    assert "is complete at step 2" in run_cli(*args, "--dry_run")[2]


def test_runs_in_one_process_may_differ_in_precision(color_folder, tiny_unet, tmp_path):
    """accelerate's process-wide state stayed set by a finished run: in a notebook or a sweep, a run with another
    --mixed_precision after it was refused, "AcceleratorState has already been initialized" (trial 59 F1)."""
    from accelerate.state import AcceleratorState, PartialState

    from conftest import reset_accelerate
    from uncond.cli import console

    reset_accelerate()  # as a fresh process starts
    for precision in ("no", "bf16", "no"):
        args = fast_train_args(color_folder, tiny_unet, tmp_path / precision, "--max_train_steps", "1",
                               "--mixed_precision", precision, "--overwrite_output_dir")
        assert console([str(arg) for arg in args]) == 0
    assert not AcceleratorState._shared_state and not PartialState._shared_state
    PartialState()  # a caller's own state is its own: left as it is
    assert console([str(arg) for arg in args]) == 0 and PartialState._shared_state
    reset_accelerate()


def test_a_second_run_in_the_same_process_at_once_is_refused(run_cli, color_folder, tiny_unet, tmp_path):
    """Two uncond.main trainings in a sweep's threads both said done, each with weights neither run gives alone
    (they share the process's random generators and accelerate's state) (trial 59 F2)."""
    from uncond import train

    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1")
    with train.ONE_RUN_AT_A_TIME:  # as a run in another thread holds it
        code, _, err = run_cli(*args)
    assert code == 75 and "uncond: error: another uncond train is running in this process" in err, err
    assert not (tmp_path / "run").exists()
    assert run_cli(*args)[0] == 0


def test_what_is_left_of_an_export_is_not_trained_over_without_overwrite(run_cli, color_folder, tiny_unet,
                                                                          tmp_path):
    """A finished run's folder with its checkpoints deleted (to save space) and model_index.json gone (a copy in
    part): the same command trained from step 0 over its weights and metrics history (trial 58 F4)."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2")
    assert run_cli(*args)[0] == 0
    shutil.rmtree(out / "checkpoint-2")
    (out / "model_index.json").unlink()
    weights, metrics = (out / "unet" / WEIGHTS).read_bytes(), (out / "metrics.jsonl").read_text()
    one_line_error(*run_cli(*args)[::2], f"--output_dir {out} already holds a trained model; pass "
                   "--overwrite_output_dir")
    assert (out / "unet" / WEIGHTS).read_bytes() == weights and (out / "metrics.jsonl").read_text() == metrics


def test_a_failed_go_back_puts_the_later_checkpoints_and_settings_back(run_cli, color_folder, tiny_unet, tmp_path):
    """Going back to checkpoint-4 with a --num_epochs that ends before it was refused only once the data was
    read: by then checkpoint-6 was set aside and training_config.json held the refused settings, so the same
    command as before went on from step 4 and trained steps 5 and 6 again."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "6")[0] == 0
    settings, metrics = (out / "training_config.json").read_text(), (out / "metrics.jsonl").read_text()
    code, _, err = run_cli(*args, "--resume_from_checkpoint", "checkpoint-4", "--num_epochs", "1")
    one_line_error(code, err, "checkpoint-4 is at step 4, past this run's last step 3")
    assert "checkpoint-6 put back from" in err
    assert checkpoints(out) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    assert not list(out.glob("abandoned-*")) and (out / "samples" / "step-0000006.png").is_file()
    assert (out / "training_config.json").read_text() == settings and (out / "metrics.jsonl").read_text() == metrics


def test_a_failed_start_removes_only_its_own_files_from_the_folder_it_made(run_cli, color_folder, tiny_unet,
                                                                          tmp_path, monkeypatch):
    """A file the user put into the new output folder while the run read its images went with the folder."""
    out = tmp_path / "run"

    def fail_after_the_user_wrote(*args, **kwargs):
        (out / "notes.txt").write_text("mine")
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_images", fail_after_the_user_wrote)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1"))
    assert code != 0 and "interrupted" in err, err
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    monkeypatch.setattr(data, "load_images", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out / "new", "--max_train_steps", "1"))[0] != 0
    assert not (out / "new").exists()  # with nothing else in it, the folder goes too


def test_a_rerun_without_use_ema_keeps_the_ema_unless_told_to_drop_it(run_cli, color_folder, tiny_unet, tmp_path):
    """The same command typed without --use_ema resumed, dropped the EMA (the weights the exports held), and
    --checkpoints_total_limit rotated away the checkpoints that still had it."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2", "--checkpoints_total_limit", "1")
    assert run_cli(*args, "--max_train_steps", "2", "--use_ema")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "4")
    one_line_error(code, err, "checkpoint-2's run kept an EMA of the weights (its exports hold it): pass --use_ema "
                              "to go on with it, or --no-use_ema to drop it")
    assert (out / "checkpoint-2" / "unet_ema").is_dir()
    code, _, err = run_cli(*args, "--max_train_steps", "4", "--no-use_ema")
    assert code == 0 and "--no-use_ema: the EMA of the weights that checkpoint-2's run kept is dropped" in err, err


def test_resuming_a_seed_checkpoint_says_whether_its_ema_goes_on(tmp_path):
    """train_unconditional.py's checkpoints have no training_config.json: its EMA (unet_ema/) was dropped without
    a word when resumed without --use_ema, and the export switched from EMA to trained weights."""
    from uncond.config import TrainConfig

    seed_checkpoint = tmp_path / "checkpoint-500"
    (seed_checkpoint / "unet").mkdir(parents=True)
    (seed_checkpoint / "unet_ema").mkdir()
    notes = checkpoint.resume_notes(seed_checkpoint, TrainConfig(), {})
    assert any("--no-use_ema: the EMA of the weights that checkpoint-500's run kept is dropped" in n for n in notes)
    assert checkpoint.resume_notes(seed_checkpoint, TrainConfig(use_ema=True), {}) == []
    (seed_checkpoint / "unet_ema").rmdir()
    notes = checkpoint.resume_notes(seed_checkpoint, TrainConfig(use_ema=True), {})
    assert any("--use_ema: checkpoint-500's run had no EMA" in note for note in notes)


def test_resume_commands_go_on_from_the_newest_checkpoint(tmp_path):
    """The stop message's command: a named --resume_from_checkpoint in it would take the run back there."""
    from uncond import outputs
    from uncond.config import TrainConfig

    argv = ["train", "--output_dir", "x", "--resume_from_checkpoint", "checkpoint-2", "--max_train_steps", "9"]
    named = TrainConfig(output_dir="x", resume_from_checkpoint="checkpoint-2")
    assert outputs.resuming_latest(argv, named) == ["train", "--output_dir", "x", "--max_train_steps", "9",
                                                  "--resume_from_checkpoint", "latest"]
    assert outputs.resuming_latest(["train", "--resume_from_checkpoint=checkpoint-2"], named) == [
        "train", "--resume_from_checkpoint", "latest"]
    assert outputs.resuming_latest(argv[:3], TrainConfig(output_dir="x")) == argv[:3]
    unset = ["train", "--resume_from_checkpoint", ""]  # an unset shell variable: no flag, as in the seed script
    assert outputs.resuming_latest(unset, TrainConfig(output_dir="x", resume_from_checkpoint="")) == unset
    # --overwrite_output_dir would remove the checkpoint the stop saved
    assert outputs.resuming_latest(["train", "--overwrite_output_dir"], TrainConfig(output_dir="x",
                                 overwrite_output_dir=True)) == ["train", "--resume_from_checkpoint", "latest"]


def test_a_stop_at_the_last_step_ends_the_run(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """It returned before the end of the run: no export of the last step until a re-run."""
    import os
    import signal

    from uncond import train

    train_step = train.train_step

    def stopped_during_the_last(run, micro_batches):
        if run.step + 1 == run.max_train_steps:
            os.kill(os.getpid(), signal.SIGTERM)  # as a preempted job gets it
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "train_step", stopped_during_the_last)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "3"))
    assert code == 0 and "done: the pipeline is in" in err, err
    assert json.loads((out / "training_state.json").read_text())["step"] == 3 and checkpoints(out) == {"checkpoint-3"}
    assert "the sample grid of step 3 is left out: the run is stopping" in err  # a preview can take minutes
    monkeypatch.setattr(train, "train_step", train_step)
    # Not with settings that did not train the model (trial 53 F1): they would show in the grid and the card
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "3",
                                            "--learning_rate", "5e-4"))
    assert code == 0 and "not made with this command's settings, other than those that trained the model " \
        "(learning_rate 0.0001 -> 0.0005)" in err and not (out / "samples").exists(), err
    # The same command again makes what the stop left out (it only said the run was complete: the grid was lost)
    for _ in range(2):  # the second time, nothing is owed any more
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "3"))
        assert code == 0 and "is complete at step 3" in err, err
        assert [path.name for path in (out / "samples").iterdir()] == ["step-0000003.png"]
        assert "samples/step-0000003.png" in (out / "README.md").read_text()
    assert "samples (" not in err and checkpoints(out) == {"checkpoint-3"}


def test_a_stop_during_the_runs_last_grid_leaves_it_to_the_re_run(run_cli, color_folder, tiny_unet, tmp_path,
                                                                  monkeypatch):
    """The run's last checkpoint is written before its last grid (mid-epoch, step 4 of 3-step epochs), so it could
    not owe that grid when a stop left it out: the re-run said the run was complete and the grid was never made
    (trial 50 F4)."""
    import signal

    generate, grids_started = sampling.generate, []

    def signalled_in_the_second_grid(*args, **kwargs):
        grids_started.append(1)
        if len(grids_started) == 2:  # the first is epoch 0's, at step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    out, straight = tmp_path / "run", tmp_path / "straight"
    extra = ("--max_train_steps", "4", "--checkpointing_steps", "2", "--save_images_epochs", "100")
    monkeypatch.setattr(sampling, "generate", signalled_in_the_second_grid)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *extra))
    assert code == 0 and "the sample grid of step 4 is left out: the run is stopping" in err, err  # as at epoch ends
    assert not (out / "samples" / "step-0000004.png").exists() and "checkpoint-4" in checkpoints(out)
    monkeypatch.setattr(sampling, "generate", generate)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *extra))
    grid = out / "samples" / "step-0000004.png"
    assert code == 0 and f"making {grid}, missing (a stop at the end of a run can leave it out)" in err, err
    assert "is complete at step 4" in err, err
    card = (out / "README.md").read_text()
    assert "samples/step-0000004.png" in card  # the card shows it
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *extra))
    assert code == 0 and "is complete at step 4" in err and "samples (" not in err, err  # made once
    assert run_cli(*fast_train_args(color_folder, tiny_unet, straight, *extra))[0] == 0
    assert np.array_equal(*(np.asarray(Image.open(folder / "samples" / "step-0000004.png"))
                            for folder in (out, straight)))  # the uninterrupted run's grid
    # Another command's settings would draw it, and write the card, as if they had trained the model (trial 53 F1)
    grid.unlink()
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *extra, "--learning_rate", "5e-4",
                                            "--sample_steps", "3"))
    assert code == 0 and f"the end of the run in {out} left its last sample grid or evaluation out; not made with " \
        "this command's settings, other than those that trained the model (learning_rate 0.0001 -> 0.0005, " \
        "sample_steps 2 -> 3): the run's own command (its training_config.json) makes them" in err, err
    assert not grid.exists() and (out / "README.md").read_text() == card
    assert json.loads((out / "training_config.json").read_text())["learning_rate"] == 1e-4


def test_loss_png_follows_the_run_between_exports(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """It was drawn at exports only (every --save_model_epochs epochs, hours apart), so a stopped run's was stale or
    missing. Here the run stops at step 2, before the first epoch's end and its export."""
    import os
    import signal

    from uncond import outputs, train

    drawn_steps = []
    draw = outputs.draw_loss_plot

    def drawing(run):
        drawn_steps.append(run.step)
        return draw(run)

    train_step = train.train_step

    def stopped_during_the_second(run, micro_batches):
        if run.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "draw_loss_plot", drawing)
    monkeypatch.setattr(train, "train_step", stopped_during_the_second)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "9",
                                            "--logging_steps", "1"))
    assert code == 143 and "stopped by SIGTERM at step 2" in err, err
    assert drawn_steps == [1, 2]  # the first log line (then at most once a minute), and the stop
    assert not (out / "model_index.json").exists() and (out / "loss.png").is_file()
    assert Image.open(out / "loss.png").size == (700, 500)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_a_folder_of_the_users_own_files_is_not_taken_for_an_earlier_run(run_cli, color_folder, tiny_unet, tmp_path,
                                                                        overwrite):
    """A project folder holding samples/, logs/ and loss.png of its own: a first run replaced loss.png and
    appended to metrics.jsonl, and --overwrite_output_dir moved samples/ and logs/ aside, then deleted them."""
    project = tmp_path / "project"
    (project / "samples").mkdir(parents=True)
    (project / "logs").mkdir()
    for path in (project / "samples" / "favourite.png", project / "logs" / "server.log", project / "loss.png"):
        path.write_text("mine")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, project, "--max_train_steps", "2"), *overwrite)
    one_line_error(code, err, f"--output_dir {project} holds samples/, loss.png, logs/, which no training run wrote")
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == [
        "logs", "logs/server.log", "loss.png", "samples", "samples/favourite.png"]
    assert all(path.read_text() == "mine" for path in project.rglob("*") if path.is_file())


@pytest.mark.parametrize("flag", ["--output_dir", "--cache_dir"])
def test_folders_that_cannot_be_made_are_refused_before_any_work(run_cli, color_folder, tiny_unet, tmp_path, flag):
    (tmp_path / "notes.txt").write_text("a file where the folder would go")
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run")
    code, _, err = run_cli(*args, flag, tmp_path / "notes.txt" / "sub")
    one_line_error(code, err, f"{flag} {tmp_path / 'notes.txt' / 'sub'}: {tmp_path / 'notes.txt'} is a file, not a "
                              f"folder; choose another {flag}")


def test_a_model_config_with_settings_left_at_their_defaults_trains(run_cli, color_folder, tmp_path):
    """UNet2DModel.from_config (the seed script's way) fills in what a config.json leaves out; one it cannot build
    is refused before the images are decoded."""
    minimal, broken = tmp_path / "minimal.json", tmp_path / "broken.json"
    minimal.write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [32, 32, 32, 32],
                                   "layers_per_block": 1}))
    broken.write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [16, 32]}))
    code, _, err = run_cli(*fast_train_args(color_folder, minimal, tmp_path / "run", "--dry_run"))
    assert code == 0, err
    code, _, err = run_cli(*fast_train_args(color_folder, broken, tmp_path / "run"))
    one_line_error(code, err, f"--model_config_name_or_path {broken}: UNet2DModel cannot be built from it")
    assert not (tmp_path / "run").exists()


def test_a_stop_during_a_preview_gives_the_preview_up(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """A preview can take minutes (1000 DDPM steps), and launchers kill a stopping run after 30 s."""
    import os
    import signal

    from uncond import sampling

    generate = sampling.generate

    def signalled_during(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", signalled_during)
    out, straight = tmp_path / "run", tmp_path / "straight"
    args = ("--max_train_steps", "9", "--save_images_epochs", "1", "--logging_steps", "5")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *args))
    assert code == 143, err
    assert "the sample grid of step 3 is left out: the run is stopping" in err
    assert "stopped by SIGTERM at step 3" in err and checkpoints(out) == {"checkpoint-3"}
    assert not (out / "samples").exists() or not list((out / "samples").iterdir())
    # the losses of steps 1-3, between log lines, go on in the checkpoint: the resumed run's log lines are the
    # uninterrupted run's (they were lost, then logged apart)
    monkeypatch.setattr(sampling, "generate", generate)
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, *args))[0] == 0
    assert run_cli(*fast_train_args(color_folder, tiny_unet, straight, *args))[0] == 0
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").open())}
              for folder in (out, straight)]
    assert losses[0].keys() == losses[1].keys() == {5, 9}
    assert all(abs(losses[0][step] - losses[1][step]) < 1e-6 for step in (5, 9)), losses
    # and the grid given up is made by the resume: the grids are the uninterrupted run's (step 3's was missing)
    grids = [sorted(path.name for path in (folder / "samples").iterdir()) for folder in (out, straight)]
    assert grids[0] == grids[1] and "step-0000003.png" in grids[0], grids
    assert np.array_equal(*(np.asarray(Image.open(folder / "samples" / "step-0000003.png"))
                            for folder in (out, straight)))


def test_a_job_stopped_during_each_resumes_owed_preview_still_trains_on(run_cli, color_folder, tiny_unet, tmp_path,
                                                                     monkeypatch):
    """A resume makes the grid its stop left out before training; a stop during it left the checkpoint as it
    was, so a job preempted that often went back to the same step for ever. And a resume stopped after making
    it made it again (minutes of sampling), once more in TensorBoard each time."""
    import os
    import signal

    from uncond import sampling

    generate, drawn = sampling.generate, []

    def signalled_during(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return generate(*args, **kwargs)

    def signalled_after(*args, **kwargs):
        drawn.append(kwargs["seed"])
        images = generate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return images

    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "9", "--save_images_epochs", "1")
    monkeypatch.setattr(sampling, "generate", signalled_during)
    code, _, err = run_cli(*args)
    assert code == 143 and "the sample grid of step 3 is left out" in err and "at step 3" in err, err
    code, _, err = run_cli(*args)  # interrupted at the resume too
    assert code == 143 and "the sample grid of step 3 is left out" in err and "at step 3" in err, err
    code, _, err = run_cli(*args)  # the third time it is given up, and the run trains on to the next grid
    assert code == 143 and "the sample grid of step 3 is given up: a stop interrupted it at an earlier resume" \
        in err and "stopped by SIGTERM at step 6" in err, err
    monkeypatch.setattr(sampling, "generate", signalled_after)
    code, _, err = run_cli(*args)  # step 6's grid made, then stopped before a new checkpoint
    assert code == 143 and "stopped by SIGTERM at step 6" in err and (out / "samples" / "step-0000006.png").is_file()
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: drawn.append(k["seed"]) or generate(*a, **k))
    drawn.clear()
    code, _, err = run_cli(*args)
    assert code == 0 and "the sample grid of step 6 was made by an earlier resume from this checkpoint" in err, err
    assert len(drawn) == 1  # step 9's grid only
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-0000006.png", "step-0000009.png"]
    assert not (out / ".uncond-owed.json").exists()  # the later checkpoints owe nothing


def test_a_second_run_on_a_folder_in_use_is_refused(run_cli, color_folder, tiny_unet, tmp_path):
    """Two runs writing one folder (a requeued job overlapping the old one) interleaved checkpoints and metrics."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another run, as far as the lock goes, holding it until told to end
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "f.write('4242 on elsewhere'); f.flush(); print('held', flush=True); sys.stdin.read()",
         str(out / run_folder.LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2")
        code, _, err = run_cli(*args)
        assert code == 75, err  # EX_TEMPFAIL: a job script tries again later, where 2 (bad input) it would not
        one_line_error(2, err, f"--output_dir {out} is in use by another uncond run (process 4242 on elsewhere); "
                               "wait for it to end, or choose another --output_dir")
        assert not list(out.glob("checkpoint-*"))
    finally:
        holder.communicate("")  # the holder ends, and with it its lock
    assert run_cli(*args)[0] == 0 and run_cli(*args, "--max_train_steps", "3")[0] == 0  # one process, in turn


def test_a_second_run_in_the_same_process_on_a_folder_in_use_is_refused(color_folder, tiny_unet, tmp_path,
                                                                        monkeypatch, capsys):
    """A notebook's run in a thread, and the next cell's on its folder: the second let go of the first's lock and
    took it, and both wrote checkpoints and metrics into the folder."""
    import threading

    from conftest import reset_accelerate
    from uncond import cli, train

    out, at_step_2, go_on = tmp_path / "run", threading.Event(), threading.Event()

    def held_at_step_2(run, micro_batches, train_step=train.train_step):
        if run.step == 2 and threading.current_thread() is not threading.main_thread():
            at_step_2.set()
            go_on.wait(60)
        return train_step(run, micro_batches)

    monkeypatch.setattr(train, "train_step", held_at_step_2)
    args = [str(arg) for arg in fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "1",
                                                "--logging_steps", "1")]
    reset_accelerate()
    first = []
    thread = threading.Thread(target=lambda: first.append(cli.console(args + ["--max_train_steps", "4"])))
    thread.start()
    try:
        assert at_step_2.wait(60)
        assert cli.console(args + ["--max_train_steps", "6", "--seed", "1"]) == 75  # try later, as for a folder
        assert "another uncond train is running in this process" in capsys.readouterr().err
    finally:
        go_on.set()
        thread.join(60)
    assert first == [0] and checkpoints(out) == {"checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"}
    assert metric_steps(out) == [1, 2, 3, 4]
    reset_accelerate()
    assert cli.console(args + ["--max_train_steps", "5"]) == 0  # the first run's end let go of the folder


def test_a_resume_says_what_it_changes_that_it_may_change(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--checkpointing_steps", "2")
    assert run_cli(*args, "--max_train_steps", "2", "--seed", "1", "--use_ema")[0] == 0
    code, _, err = run_cli(*args, "--max_train_steps", "4", "--seed", "2", "--no-use_ema", "--dry_run")
    assert code == 0, err
    assert "--seed 2: checkpoint-2's run used seed 1; its data order, crops and noise follow seed 2 from here" in err
    assert "--no-use_ema: the EMA of the weights that checkpoint-2's run kept is dropped" in err


def test_compile_on_a_cpu_is_refused_before_compiling(run_cli, color_folder, tiny_unet, tmp_path):
    """torch 2.13's CPU compiler computes the UNet's gradients wrongly (NaN under bf16): the run trained another
    model, or failed after minutes of compiling with a message blaming the learning rate."""
    out = tmp_path / "run"
    for precision in ("no", "bf16"):
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--compile", "--mixed_precision",
                                                precision))
        one_line_error(code, err, "--compile on a CPU: torch")
        assert "drop --compile" in err and not out.exists()
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--compile", "--dry_run"))  # passed it
    one_line_error(code, err, "--compile on a CPU: torch")


def test_compile_trains_as_eager_and_saves_the_plain_unet(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """--compile wraps the UNet for training only: its checkpoints and export hold the plain UNet's weights
    (no torch.compile prefix), which load without compiling, and a run resumed from them compiles again.
    Compiled with dynamo's eager backend here (the same operations, seconds instead of inductor's minutes
    on this CPU), so the weights must match an uncompiled run's."""
    from uncond import parts, plan

    plugin = parts.TorchDynamoPlugin
    monkeypatch.setattr(parts, "TorchDynamoPlugin", lambda **settings: plugin(**{**settings, "backend": "eager"}))
    monkeypatch.setattr(plan, "CPU_COMPILER_MISCOMPUTES_GRADIENTS", False)  # inductor's C++ code is not used
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    for out, extra in ((compiled, ["--compile"]), (eager, [])):
        code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4",
                                                "--checkpointing_steps", "2", "--use_ema", *extra))
        assert code == 0 and ("torch.compile" in err) == (out == compiled), err
    for folder in ("unet", "checkpoint-2/unet", "checkpoint-4/unet_ema"):
        weights = load_file(compiled / folder / "diffusion_pytorch_model.safetensors")
        reference = load_file(eager / folder / "diffusion_pytorch_model.safetensors")
        assert weights.keys() == reference.keys()
        assert all(torch.allclose(weights[name], reference[name], atol=1e-6) for name in weights), folder
    DiffusionPipeline.from_pretrained(compiled)  # the export loads as any pipeline
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, compiled, "--max_train_steps", "6",
                                            "--checkpointing_steps", "2", "--use_ema", "--compile"))
    assert code == 0 and "resuming from" in err and "torch.compile" in err, err
    assert (compiled / "checkpoint-6").is_dir()


def test_the_same_run_is_known_from_any_working_folder(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """A Makefile or CI job re-runs its command from another folder, or with paths written otherwise: the run is
    the same, complete; and its training_config.json is reused with --config from anywhere."""
    (tmp_path / "jobs" / "nightly").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "jobs" / "nightly")
    args = fast_train_args("../../color", tiny_unet, "../run", "--max_train_steps", "1", "--overwrite_output_dir")
    assert run_cli(*args)[0] == 0
    settings = json.loads((tmp_path / "jobs" / "run" / "training_config.json").read_text())
    assert settings["train_data_dir"] == str(color_folder)  # as it leads, not as typed
    assert settings["output_dir"] == str(tmp_path / "jobs" / "run") and "overwrite_output_dir" not in settings
    monkeypatch.chdir(tmp_path)
    for images in "color", str(color_folder), "./jobs/../color/":
        code, _, err = run_cli(*fast_train_args(images, tiny_unet, "jobs/run", "--max_train_steps", "1"))
        assert code == 0 and "is complete at step 1" in err, err
    monkeypatch.chdir(tmp_path / "jobs")  # the recorded settings, from yet another folder: the same run, complete
    code, _, err = run_cli("train", "--config", "run/training_config.json")  # (it started another run here, or with
    assert code == 0 and "is complete at step 1" in err, err                 # --overwrite_output_dir replaced it)
    assert "ignored" not in err  # every setting in the file is given, but not otherwise than by default
    code, _, err = run_cli("train", "--config", "run/training_config.json", "--output_dir", "again")
    assert code == 0, err
    assert json.loads((tmp_path / "jobs" / "again" / "training_config.json").read_text())["train_data_dir"] == \
        str(color_folder)
    # Earlier versions recorded output_dir as typed, and --overwrite_output_dir: from another folder the file
    # started a new run there, unsaid; and it replaced the run (its checkpoints and export deleted) each time.
    old_record = tmp_path / "jobs" / "run" / "training_config.json"
    old_record.write_text(json.dumps({**settings, "output_dir": "../run", "overwrite_output_dir": True}))
    code, _, err = run_cli("train", "--config", "run/training_config.json")  # from jobs/: ../run is not it
    one_line_error(code, err, f"--config run/training_config.json: its output_dir ../run is relative (as earlier "
                              f"versions of uncond recorded it) and leads from here to {tmp_path / 'run'}, not to the "
                              f"run that holds the file; pass --output_dir {tmp_path / 'jobs' / 'run'} to go on")
    monkeypatch.chdir(tmp_path / "jobs" / "nightly")  # where the run was started: the same run, kept
    code, _, err = run_cli("train", "--config", "../run/training_config.json", "--max_train_steps", "2")
    assert code == 0 and "its overwrite_output_dir is ignored" in err and "resuming from checkpoint-1" in err, err
    from uncond.config import list_checkpoints

    assert [path.name for _, path in list_checkpoints(tmp_path / "jobs" / "run")] == ["checkpoint-1", "checkpoint-2"]


def test_a_log_file_gets_progress_as_lines(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """stderr redirected (a batch job's log, `> log.txt`): the bars' carriage-return redraws were all kept in the
    file, and the log's own lines glued onto them."""
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "3",
                                            "--logging_steps", "1"))
    assert code == 0, err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert any(line.startswith("exported the pipeline at step 3 to ") for line in lines)
    progress = [line for line in lines if line.startswith("training: ")]
    assert progress[0].startswith("training: 0/3 steps (0%)")
    assert re.match(r"training: 3/3 steps \(100%\), .* elapsed, .* left, .*(step/s|s/step), loss=\d",
                    progress[-1])
    assert len(progress) == 2  # seconds apart: the start and the end (a line a minute in between)
    # a line drawn at a logged step shows its values (with lines at every step, the last showed the first step's)
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "every", "--max_train_steps", "3",
                                            "--logging_steps", "3"))
    last = json.loads((tmp_path / "every" / "metrics.jsonl").read_text().splitlines()[-1])
    line = [line for line in err.splitlines() if line.startswith("training: 3/3")][-1]
    assert code == 0 and f"loss={last['loss']:.4f}, lr={last['lr']:.2e}" in line, line


@pytest.mark.parametrize("unwritable", ["a file", "a read-only disk"])
def test_an_unwritable_default_cache_is_said_before_any_work(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch,
                                                            unwritable):
    """$XDG_CACHE_HOME (or a home) that cannot be written: a traceback from the cache's mkdir, after the listing."""
    from uncond import cache, data

    monkeypatch.setattr(data, "cache_root", cache.cache_root)  # the real default, not the tests' folder
    if unwritable == "a file":
        (tmp_path / "cache-file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-file"))
        reason = "is a file, not a folder"
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
        reason = "is not writable"
    args = [arg for arg in fast_train_args(color_folder, tiny_unet, tmp_path / "run") if arg != "--cache_dir"]
    args.remove(color_folder.parent / "image-cache")
    with contextlib.ExitStack() as stack:
        if unwritable != "a file":
            stack.enter_context(mounted_tmpfs(tmp_path / "ro", "ro,size=64k"))
        code, _, err = run_cli(*args)
    one_line_error(code, err, f"the decoded-image cache {tmp_path}")
    one_line_error(code, err, f"{reason}; pass --cache_dir DIR on a writable disk")
    assert not (tmp_path / "run").exists()
    assert run_cli(*args, "--cache_dir", tmp_path / "writable", "--max_train_steps", "1")[0] == 0


def test_fine_tuning_starts_from_a_models_weights_and_schedule(run_cli, color_folder, tiny_unet, tmp_path):
    """--pretrained_model_name_or_path: there was no way to start from a trained model (google/ddpm-cifar10-32,
    one's own earlier run); --model_config_name_or_path takes the architecture alone."""
    first = tmp_path / "first"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, first, "--max_train_steps", "2", "--prediction_type",
                                    "v_prediction", "--ddpm_num_steps", "200", "--checkpointing_steps", "2",
                                    "--use_ema"))[0] == 0
    exported = load_file(first / "unet" / WEIGHTS)  # the EMA weights, as are checkpoint-2's by default
    # barely moved by one step at a learning rate of 1e-12: the weights it starts from are the model's
    still = ("--max_train_steps", "1", "--learning_rate", "1e-12", "--lr_scheduler", "constant", "--lr_warmup_steps",
             "0")
    for start in (first, first / "checkpoint-2"):  # (an EMA checkpoint's config: a TypeError on its `decay`)
        out = tmp_path / f"tuned-{start.name}"
        code, _, err = run_cli(*fast_train_args(color_folder, "", out, "--pretrained_model_name_or_path", start,
                                                *still))
        assert code == 0 and "starting from the weights of " in err, err
        # the model's short schedule is kept, not to be changed: no advice to lengthen it (as its own run had)
        assert "of the image in the noisiest training input" not in err
        tuned = load_file(out / "unet" / WEIGHTS)
        assert all(torch.allclose(tuned[name], exported[name], atol=1e-6) for name in exported)
        settings = json.loads((out / "training_config.json").read_text())
        assert (settings["prediction_type"], settings["ddpm_num_steps"], settings["resolution"]) == \
               ("v_prediction", 200, 16)  # the model's schedule and size, not the defaults (epsilon, 1000, 64)
        assert "starting from the weights of" in (out / "README.md").read_text()
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "fresh", *still))  # other weights
    assert code == 0, err
    fresh = load_file(tmp_path / "fresh" / "unet" / WEIGHTS)
    assert not torch.allclose(fresh["conv_in.weight"], exported["conv_in.weight"])
    # the model gone, its fine-tuning goes on from its checkpoint, with the settings it took from the model
    base = Path(shutil.copytree(first, tmp_path / "base"))
    tuned_args = fast_train_args(color_folder, "", tmp_path / "tuned-base", "--pretrained_model_name_or_path", base,
                                 *still)
    assert run_cli(*tuned_args)[0] == 0
    shutil.rmtree(base)
    code, _, err = run_cli(*tuned_args)
    assert code == 0 and "is complete at step 1" in err, err
    code, _, err = run_cli(*tuned_args, "--max_train_steps", "2")
    assert code == 0 and "resuming from checkpoint-1 at step 1" in err, err
    # given otherwise, said; with another model's description, refused
    code, _, err = run_cli(*fast_train_args(color_folder, "", tmp_path / "eps", "--pretrained_model_name_or_path",
                                            first, "--prediction_type", "epsilon", "--resolution", "32", "--dry_run"))
    assert code == 0 and f"--prediction_type epsilon: {first} was trained with prediction_type v_prediction; the " \
                         "fine-tuning changes it" in err, err
    assert f"--resolution 32: {first} was trained at 16 px; the fine-tuning changes it" in err
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "both",
                                            "--pretrained_model_name_or_path", first, "--dry_run"))
    one_line_error(code, err, "--pretrained_model_name_or_path gives the UNet: leave out --model_preset and "
                              "--model_config_name_or_path")
    code, _, err = run_cli(*fast_train_args(color_folder, "", tmp_path / "none", "--pretrained_model_name_or_path",
                                            tmp_path / "missing", "--dry_run"))
    one_line_error(code, err, f"--pretrained_model_name_or_path {tmp_path / 'missing'}: no such folder")

def test_progress_lines_are_not_repeated(capsys, monkeypatch):
    """tqdm's monitor thread redraws a bar not drawn for 10 s: in a log file, an extra line 19 s after each, and
    the last line twice."""
    from uncond import progress

    monkeypatch.setenv("TQDM_MININTERVAL", "3600")
    bar = progress.progress_bar(total=4, desc="training", unit="step")
    assert isinstance(bar, progress.ProgressLines) and bar.miniters == 1  # the monitor redraws only miniters > 1
    bar.update(4)
    bar.refresh()  # as the monitor, or a log line written through tqdm, redraws it
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["training: 0/4 steps (0%)", "training: 4/4 steps (100%)"]


@pytest.mark.parametrize("columns", [0, 100])
def test_a_terminal_without_a_width_gets_progress_as_lines(columns):
    """A pseudo-terminal reporting 0 columns (`script` from a non-terminal, some CI runners) showed nothing:
    tqdm drew its bar 0 characters wide. It gets the log file's lines; a terminal with a width, the bar."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    reader, terminal = pty.openpty()  # a new pseudo-terminal reports 0 x 0
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    code = ("from uncond.progress import progress_bar\n"
            "with progress_bar(total=3, desc='training', unit='step', dynamic_ncols=True, mininterval=0) as bar:\n"
            "    bar.set_postfix(lr='4.00e-07')\n"
            "    bar.update(3)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=terminal)
    os.close(terminal)
    shown = b""
    while select.select([reader], [], [], 60)[0]:
        try:
            chunk = os.read(reader, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(reader)
    assert process.wait(timeout=60) == 0
    text = shown.decode()
    if columns == 0:
        assert "training: 3/3 steps (100%)" in text and "\r" not in text.replace("\r\n", "")
        assert text.endswith("step/s, lr=4.00e-07\r\n"), text  # not cut short: "lr=4.00e-0"
    else:
        assert "training: 100%" in text and "3/3" in text  # tqdm's bar, redrawn in place


def test_a_schedule_of_other_betas_trains_and_is_fine_tuned_with_them(run_cli, color_folder, tiny_unet, tmp_path):
    """Stable Diffusion's scaled_linear betas (0.00085 to 0.012): no flag gave them, so a model trained on them
    could not be fine-tuned (refused: its betas were not those of --ddpm_beta_schedule)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    betas = ("--ddpm_beta_schedule", "scaled_linear", "--ddpm_beta_start", "0.00085", "--ddpm_beta_end", "0.012")
    assert run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "sd", "--max_train_steps", "1", *betas))[0] == 0
    exported = DDPMScheduler.from_pretrained(tmp_path / "sd" / "scheduler")
    assert (exported.config.beta_start, exported.config.beta_end) == (0.00085, 0.012)
    expected = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    assert torch.equal(exported.betas, expected) and torch.equal(DDIMScheduler.from_config(exported.config).betas,
                                                                 expected)
    code, stdout, err = run_cli(*fast_train_args(color_folder, "", tmp_path / "tuned", "--dry_run",
                                                 "--pretrained_model_name_or_path", tmp_path / "sd"))
    assert code == 0, err
    settings = json.loads(stdout)
    assert (settings["ddpm_beta_schedule"], settings["ddpm_beta_start"], settings["ddpm_beta_end"]) == \
           ("scaled_linear", 0.00085, 0.012)


def test_zero_terminal_snr_trains_samples_and_is_fine_tuned_with_it(run_cli, color_folder, tiny_unet, tmp_path):
    """DDPM's linear betas leave some of the image in the noisiest training input, which sampling starts without:
    no flag gave diffusers' rescale_betas_zero_snr (Lin et al. 2024), so dark and light images came out grey."""
    from diffusers import DDPMScheduler

    zero_snr = ("--rescale_betas_zero_snr", "--prediction_type", "v_prediction")
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "2", *zero_snr)
    assert run_cli(*args)[0] == 0
    exported = DDPMScheduler.from_pretrained(tmp_path / "run" / "scheduler")
    assert exported.config.rescale_betas_zero_snr and float(exported.alphas_cumprod[-1]) == 0.0
    for sampler in ("euler", "ddim"):  # a sampler that takes the setting caps the infinite last noise level
        code, _, err = run_cli("sample", tmp_path / "run", "--sampler", sampler, "--steps", "3", "--num_images", "2",
                               "--output_dir", tmp_path / sampler)
        assert code == 0, err
        images = [np.asarray(Image.open(path)) for path in sorted((tmp_path / sampler).glob("*.png"))]
        assert len(images) == 2 and all(image.std() > 0 for image in images)
    code, _, err = run_cli("sample", tmp_path / "run", "--sampler", "heun", "--output_dir", tmp_path / "heun")
    one_line_error(code, err, "--sampler heun cannot sample this model (its noise schedule ends at zero SNR")
    code, _, err = run_cli(*args[:-1], "epsilon", "--dry_run")
    one_line_error(code, err, "--rescale_betas_zero_snr needs --prediction_type v_prediction")
    code, stdout, err = run_cli(*fast_train_args(color_folder, "", tmp_path / "tuned", "--dry_run",
                                                 "--pretrained_model_name_or_path", tmp_path / "run"))
    assert code == 0 and json.loads(stdout)["rescale_betas_zero_snr"], err  # the model's schedule, kept
    code, _, err = run_cli(*fast_train_args(color_folder, "", tmp_path / "tuned", "--dry_run", "--prediction_type",
                                            "epsilon", "--pretrained_model_name_or_path", tmp_path / "run"))
    one_line_error(code, err, "--rescale_betas_zero_snr needs --prediction_type v_prediction")


def test_the_progress_bar_shows_the_loss_from_the_first_step(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """On a terminal the bar showed no loss until the first log line (--logging_steps, 10 steps by default)."""
    from uncond import progress, train

    monkeypatch.setattr(progress, "draws_bars", lambda: True)  # as on a terminal
    drawn = progress.progress_bar  # redrawn at every step, however fast (at most every 0.1 s by default)
    monkeypatch.setattr(train, "progress_bar", lambda *args, **options: drawn(*args, **{**options, "mininterval": 0}))
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "3",
                                            "--logging_steps", "100", "--save_images_epochs", "100"))
    assert code == 0, err
    first_step = next(draw for draw in re.split(r"[\r\n]", err) if draw.startswith("training:") and " 1/3 " in draw)
    assert re.search(r"loss=\d\.\d{4}, lr=\d\.\d\de-\d\d", first_step), first_step


def test_fp16_on_a_cpu_says_it_trains_in_fp32(run_cli, color_folder, tiny_unet, tmp_path):
    """accelerate trains fp16 on CPUs in fp32, without autocast or loss scaling: the log said `fp16 autocast`, and
    the model card says it still (trial 61 F4). The flag as given stays in training_config.json (the same
    settings on a GPU train in fp16)."""
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "1",
                                            "--mixed_precision", "fp16"))
    assert code == 0, err[-2000:]
    assert "--mixed_precision fp16 on cpu: accelerate has no fp16 autocast there and trains in fp32" in err
    assert "precision fp32 (no fp16 autocast on cpu)" in err and "fp16 autocast," not in err
    assert "| mixed precision | fp32 (no fp16 autocast on cpu) |" in (out / "README.md").read_text()
    assert json.loads((out / "training_state.json").read_text())["precision"] == "fp32 (no fp16 autocast on cpu)"
    assert json.loads((out / "training_config.json").read_text())["mixed_precision"] == "fp16"
