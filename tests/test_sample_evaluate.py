"""`uncond sample` and `uncond evaluate` on tiny pipelines and images the tests write, and evaluation
during training, with a tiny stand-in for the Inception network."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import uncond
from conftest import TINY_UNET, RunsCode, fast_train_args, mounted_tmpfs, save_tiny_pipeline, write_images
from uncond.config import TrainConfig, UsageError, add_train_arguments, build_config
from uncond.manifest import write_manifest
from test_train import one_line_error


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "rgb")


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))]


def test_sample_writes_numbered_pngs_the_same_whatever_the_batch_size(run_cli, pipeline, tmp_path):
    code, _, err = run_cli("sample", pipeline, "--num_images", 5, "--batch_size", 2, "--steps", 3, "--device", "cpu",
                           "--output_dir", tmp_path / "a", "--grid", tmp_path / "grid.png")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == [f"00000{i}.png" for i in range(5)]
    assert Image.open(tmp_path / "a" / "000000.png").size == (16, 16)
    assert Image.open(tmp_path / "grid.png").size == (3 * 18 + 2, 2 * 18 + 2)  # 3 x 2 tiles with borders
    assert "wrote 5 images (16x16, RGB)" in err and "3 network evaluations per image" in err
    assert "Loading pipeline components" not in err  # diffusers' bar, a flash of two components
    # the progress counts the steps of every batch: "sampling 5 images: 9/9 steps" read as one per image
    assert "sampling 5 images in 3 batches: 9/9 steps" in err, err
    code, _, err = run_cli("sample", pipeline, "--num_images", 5, "--batch_size", 5, "--steps", 3, "--device", "cpu",
                           "--output_dir", tmp_path / "b")
    assert code == 0, err
    for a, b in zip(pixels(tmp_path / "a"), pixels(tmp_path / "b"), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding of batched convolutions only


def test_a_leading_tilde_is_the_home_folder_where_the_shell_leaves_it(pipeline, tmp_path, monkeypatch, capsys):
    """`--output_dir=~/x` (bash expands no ~ after =), a path in uncond.main("...")'s one string, a config file's
    path: each made or looked for a folder named ~ in the current folder (trial 64 F11)."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    shutil.copytree(pipeline, home / "model")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert uncond.main("sample ~/model --num_images 2 --steps 2 --output_dir=~/samples --grid=~/g.png") == 0
    assert len(list((home / "samples").glob("*.png"))) == 2 and (home / "g.png").is_file()
    write_images(home / "pics", 2)
    (home / "settings.json").write_text(json.dumps({"train_data_dir": "~/pics", "output_dir": "~/run",
                                                    "model_config_name_or_path": "~/model/unet"}))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config, _ = build_config(vars(parser.parse_args(["--config=~/settings.json", "--cache_dir=~/cache"])))
    assert (config.train_data_dir, config.output_dir, config.cache_dir) == (
        str(home / "pics"), str(home / "run"), str(home / "cache"))
    assert config.model_config_name_or_path == str(home / "model" / "unet")
    assert list(work.iterdir()) == []
    capsys.readouterr()
    for command in ("sample ~no-such-user-x/model --output_dir=~/s", "train --output_dir=~no-such-user-x/run",
                    "train --config=~no-such-user-x/settings.json"):  # (a traceback; trial 67 F2)
        assert uncond.main(command) == 2, command
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "no user 'no-such-user-x' has a home folder here" in error, error


@pytest.mark.parametrize("steps, warned", [(1, "ddpm with 1 step starts at timestep 0, not at 999"),
                                           (10, "ddpm with 10 steps starts at timestep 900, not at 999"),
                                           (20, None), (1000, None)])  # 20 starts at 950: noise as pure
def test_ddpm_with_few_steps_says_it_starts_below_pure_noise(run_cli, pipeline, tmp_path, steps, warned):
    """One ddpm step wrote the drawn noise back without a word (trial 41): DDPMPipeline's "leading" timesteps."""
    code, _, err = run_cli("sample", pipeline, "--sampler", "ddpm", "--steps", steps, "--num_images", 1,
                           "--device", "cpu", "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert (warned in err) if warned else "starts at timestep" not in err


def test_sample_from_a_one_channel_ddim_pipeline_writes_grayscale(run_cli, tmp_path):
    model = save_tiny_pipeline(tmp_path / "gray-ddim", channels=1, scheduler="ddim")
    code, _, err = run_cli("sample", model, "--num_images", 2, "--sampler", "ddim", "--steps", 2,
                           "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert "(DDIMPipeline)" in err
    assert {Image.open(path).mode for path in (tmp_path / "out").glob("*.png")} == {"L"}


def test_an_interrupted_sample_is_completed_by_the_same_command(run_cli, pipeline, tmp_path, monkeypatch):
    from uncond import sample_folder

    out = tmp_path / "out"
    args = ("sample", pipeline, "--num_images", 6, "--batch_size", 2, "--steps", 2, "--grid", tmp_path / "grid.png")
    assert run_cli(*args, "--output_dir", tmp_path / "whole", "--overwrite")[0] == 0
    (tmp_path / "grid.png").rename(tmp_path / "whole-grid.png")
    write_whole, written = sample_folder.write_whole, []

    def interrupted_after_three(image, path):
        if len(written) == 3:  # Ctrl-C while the fourth image is being written
            path.with_name(path.name + sample_folder.PARTIAL_SUFFIX).write_bytes(b"half a PNG")
            raise KeyboardInterrupt
        written.append(path)
        write_whole(image, path)

    monkeypatch.setattr(sample_folder, "write_whole", interrupted_after_three)
    code, _, err = run_cli(*args, "--output_dir", out)
    assert code == 130 and "interrupted with 3 of 6 images written; run the same command again" in err
    assert sorted(path.name for path in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    monkeypatch.setattr(sample_folder, "write_whole", write_whole)
    (out / "ubuntu.iso.partial").write_bytes(b"a download of the user's, under way")  # not an image of ours
    code, _, err = run_cli(*args, "--output_dir", out)
    assert code == 0, err
    assert "already holds 3 of the 6 images of these settings; sampling the other 3" in err
    assert "wrote 3 images" in err and [path.name for path in out.glob("*.partial")] == ["ubuntu.iso.partial"]
    (out / "ubuntu.iso.partial").unlink()
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "whole-grid.png").read_bytes()
    for a, b in zip(pixels(tmp_path / "whole"), pixels(out), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding of batched convolutions only
    # done: the same command samples nothing and rewrites nothing
    written_at = {path: path.stat().st_mtime_ns for path in out.iterdir()}
    code, _, err = run_cli(*args, "--output_dir", out)
    assert code == 0 and "already holds the 6 images of these settings; nothing to sample" in err
    assert {path: path.stat().st_mtime_ns for path in out.iterdir() if path.suffix == ".png"} == {
        path: time for path, time in written_at.items() if path.suffix == ".png"}
    # more images extend the set the same way
    code, _, err = run_cli(*args[:3], 8, *args[4:], "--output_dir", out)
    assert code == 0 and "sampling the other 2" in err and len(list(out.glob("0*.png"))) == 8
    # --overwrite keeps the images of these settings as they are; with fewer images, the first ones
    code, _, err = run_cli(*args[:3], 8, *args[4:], "--output_dir", out, "--overwrite")
    assert code == 0 and "already holds the 8 images of these settings; nothing to sample" in err
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("0*.png") if int(path.stem) < 4}
    one_line_error(*run_cli(*args[:3], 4, *args[4:], "--output_dir", out)[::2], "pass --overwrite to keep only 4")
    code, _, err = run_cli(*args[:3], 4, *args[4:], "--output_dir", out, "--overwrite")
    assert code == 0 and "nothing to sample" in err
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("0*.png")} == kept
    # an --overwrite interrupted at once leaves none of the earlier images under its settings...
    monkeypatch.setattr(sample_folder, "write_whole", interrupted_after_three)
    assert run_cli(*args, "--output_dir", out, "--overwrite", "--seed", 9)[0] == 130
    assert not list(out.glob("0*.png"))
    # ...and one interrupted later is completed by the same command, --overwrite and all
    written.clear()
    code, _, err = run_cli(*args, "--output_dir", out, "--overwrite", "--seed", 9)
    assert code == 130 and "run the same command again" in err and len(list(out.glob("0*.png"))) == 3
    monkeypatch.setattr(sample_folder, "write_whole", write_whole)
    code, _, err = run_cli(*args, "--output_dir", out, "--overwrite", "--seed", 9)
    assert code == 0 and "already holds 3 of the 6 images of these settings; sampling the other 3" in err


def test_a_sample_ended_by_sigterm_says_how_far_it_got(run_cli, pipeline, tmp_path, monkeypatch):
    """A batch job's end (SIGTERM) ended `uncond sample` without a word; now as Ctrl-C, with the shell's 143."""
    from uncond import sample_folder

    out, write_whole, written = tmp_path / "out", sample_folder.write_whole, []

    def terminated_after_two(image, path):
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        written.append(path)
        write_whole(image, path)

    monkeypatch.setattr(sample_folder, "write_whole", terminated_after_two)
    args = ("sample", pipeline, "--num_images", 4, "--batch_size", 4, "--steps", 1, "--output_dir", out)
    code, _, err = run_cli(*args)
    assert code == 143 and "stopped by SIGTERM with 2 of 4 images written; run the same command again" in err, err
    assert sorted(path.name for path in out.glob("0*.png")) == ["000000.png", "000001.png"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as it was
    monkeypatch.setattr(sample_folder, "write_whole", write_whole)
    code, _, err = run_cli(*args)
    assert code == 0 and "sampling the other 2" in err, err


def test_sample_never_mixes_images_of_other_settings_unless_overwriting(run_cli, pipeline, tmp_path):
    import shutil

    from diffusers import UNet2DModel

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(pipeline, model)
    args = ("sample", model, "--num_images", 2, "--steps", 1, "--output_dir", out)
    assert run_cli(*args)[0] == 0
    code, _, err = run_cli(*args, "--seed", 5)
    one_line_error(code, err, f"--output_dir {out} holds 2 images sampled with other settings (seed 0); choose "
                              "another --output_dir, or pass --overwrite")
    assert "sampling 2 images" not in err  # a refused sampling does not say it starts
    unet = UNet2DModel.from_pretrained(model / "unet")  # the model trained on, in the same folder
    with torch.no_grad():
        unet.conv_out.bias += 0.1
    unet.save_pretrained(model / "unet")
    code, _, err = run_cli(*args)
    one_line_error(code, err, "sampled with other settings (the model's weights)")
    code, _, err = run_cli(*args[:3], 1, *args[4:])
    one_line_error(code, err, "sampled with other settings")
    assert run_cli(*args[:3], 1, *args[4:], "--overwrite")[0] == 0
    assert sorted(path.name for path in out.glob("*.png")) == ["000000.png"]
    # numbered images that uncond did not record (another tool's, or older uncond's) are never added to
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (16, 16)).save(other / "000000.png")
    code, _, err = run_cli(*args[:-1], other)
    one_line_error(code, err, "already holds 1 numbered images that no `uncond sample` recorded there (yours, "
                              "another tool's or an older uncond's); choose another --output_dir, or pass --overwrite")
    assert len(list(other.iterdir())) == 1


def test_sample_continues_the_same_model_named_otherwise_and_tells_what_changed(run_cli, pipeline, tmp_path):
    import shutil

    out, copy = tmp_path / "out", tmp_path / "copy"
    args = ("--steps", 1, "--output_dir", out)
    assert run_cli("sample", pipeline, "--num_images", 2, *args)[0] == 0
    shutil.copytree(pipeline, copy)  # the same model under another path
    code, _, err = run_cli("sample", copy, "--num_images", 3, *args)
    assert code == 0 and "already holds 2 of the 3 images of these settings; sampling the other 1" in err, err
    code, _, err = run_cli("sample", copy, "--num_images", 3, *args, "--dtype", "bfloat16")
    one_line_error(code, err, "sampled with other settings (dtype float32);")  # not "the model's weights" too
    code, _, err = run_cli("sample", copy, "--num_images", 3, *args, "--sampler", "ddim")
    one_line_error(code, err, "sampled with other settings (sampler sde-dpmsolver++);")  # not the schedule too
    scheduler_file = copy / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler_config, "beta_end": 0.03}))
    code, _, err = run_cli("sample", copy, "--num_images", 3, *args)
    one_line_error(code, err, "sampled with other settings (the model's noise schedule);")
    assert len(list(out.glob("*.png"))) == 3


def test_sample_settings_are_standard_json_and_earlier_ones_still_match(run_cli, pipeline, tmp_path):
    """DPMSolver's lambda_min_clipped (-inf) was written as -Infinity, which strict JSON readers refuse."""
    out = tmp_path / "images"
    args = ("sample", pipeline, "--num_images", 2, "--steps", 2, "--device", "cpu", "--output_dir", out)
    assert run_cli(*args)[0] == 0

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    settings = json.loads((out / "sample_settings.json").read_text(), parse_constant=refuse)
    assert settings["schedule"]["lambda_min_clipped"] == "-inf"
    settings["schedule"]["lambda_min_clipped"] = float("-inf")  # as uncond wrote it before
    (out / "sample_settings.json").write_text(json.dumps(settings))
    code, _, err = run_cli(*args)
    assert code == 0 and "already holds the 2 images of these settings" in err, err


def test_sample_keeps_its_grid_apart_from_the_images(run_cli, pipeline, tmp_path):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    code, _, err = run_cli("sample", pipeline, "--num_images", 2, "--steps", 1, "--output_dir", out,
                           "--grid", out / "000002.png")
    one_line_error(code, err, f"--grid {out / '000002.png'} is named like the numbered images in --output_dir")
    assert not out.exists()
    args = ("sample", pipeline, "--steps", 1, "--output_dir", out)
    assert run_cli(*args, "--num_images", 2, "--grid", grid)[0] == 0
    assert run_cli(*args, "--num_images", 3)[0] == 0  # images added without asking for the grid again
    code, _, err = run_cli(*args, "--num_images", 3, "--grid", grid)  # still the folder's own grid, redone
    assert code == 0, err
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)  # 3 images tiled 2 x 2, not the first run's 2 x 1


def test_sample_does_not_overwrite_a_grid_unless_asked(run_cli, pipeline, tmp_path):
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"mine")
    args = ("sample", pipeline, "--num_images", 2, "--steps", 1, "--output_dir", tmp_path / "out", "--grid", grid)
    code, _, err = run_cli(*args)
    one_line_error(code, err, "--grid")
    assert grid.read_bytes() == b"mine" and not (tmp_path / "out").exists()
    assert run_cli(*args, "--overwrite")[0] == 0
    assert Image.open(grid).size[0] > 16
    # the folder's own grid, since replaced by another one (another folder's sampling), is that one's now
    grid.write_bytes(b"another sampling's grid")
    code, _, err = run_cli(*args)
    one_line_error(code, err, "--grid")
    assert grid.read_bytes() == b"another sampling's grid"


def test_a_full_disk_keeps_the_earlier_grid_and_the_same_command_finishes(run_cli, pipeline, tmp_path,
                                                                            monkeypatch):
    """The grid is written under another name and renamed: a disk that fills while it is written leaves the
    earlier grid whole, which the same command, run again, may then replace."""
    grid = tmp_path / "grid.png"
    args = ("sample", pipeline, "--steps", 1, "--output_dir", tmp_path / "out", "--grid", grid)
    assert run_cli(*args, "--num_images", 2)[0] == 0
    earlier = grid.read_bytes()
    save = Image.Image.save

    def save_on_a_full_disk(image, path, *rest, **options):
        if str(path).endswith("grid.png.partial"):
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(image, path, *rest, **options)

    monkeypatch.setattr(Image.Image, "save", save_on_a_full_disk)
    code, _, err = run_cli(*args, "--num_images", 4)
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        f"uncond: stopped: no space left on the device writing the grid {grid}; the 4 images are written, and an "
        "earlier grid is kept whole; free some space and re-run the same command to write the grid")
    assert grid.read_bytes() == earlier and not list(tmp_path.glob("*.partial"))
    monkeypatch.setattr(Image.Image, "save", save)
    code, _, err = run_cli(*args, "--num_images", 4)
    assert code == 0, err
    assert Image.open(grid).size == (2 * 18 + 2, 2 * 18 + 2)  # the four images, 2 x 2


def test_an_output_that_cannot_be_written_is_refused_before_sampling(run_cli, pipeline, tmp_path):
    (tmp_path / "a file").write_text("")
    code, _, err = run_cli("sample", pipeline, "--output_dir", tmp_path / "a file" / "out")
    one_line_error(code, err, "--output_dir")
    assert "is a file, not a folder" in err
    with mounted_tmpfs(tmp_path / "read-only", "ro,size=64k") as read_only:
        for flag, path in (("--output_dir", read_only / "out"), ("--grid", read_only / "grid.png")):
            code, _, err = run_cli("sample", pipeline, "--output_dir", tmp_path / "out", flag, path)
            one_line_error(code, err, f"{flag} {path}: {read_only} is not writable; choose another {flag}")
            assert "Loading" not in err and not (tmp_path / "out").exists()


def test_a_signal_once_the_images_are_written_reaches_the_caller_after_the_command(pipeline, tmp_path, monkeypatch,
                                                                                    capsys):
    """A SIGTERM as the grid was drawn, the images all written, stopped `uncond sample` as "stopped by SIGTERM",
    143 (trial 56 F3). It finishes (status 0, the grid written); uncond.main's caller gets the signal after."""
    import uncond
    from uncond import sample_folder

    image_grid, received = sample_folder.image_grid, []

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return image_grid(*args, **kwargs)

    monkeypatch.setattr(sample_folder, "image_grid", signalled)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        status = uncond.main(["sample", pipeline, "--num_images", 2, "--steps", 1, "--output_dir", tmp_path / "out",
                              "--grid", tmp_path / "grid.png"])
        assert received == [signal.SIGTERM]  # delivered before main returned, to the caller's handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 0 and (tmp_path / "grid.png").is_file(), capsys.readouterr().err
    assert "stopped" not in capsys.readouterr().err


def test_a_model_predicting_a_learned_variance_is_refused_in_one_line(run_cli, color_folder, tmp_path):
    """A UNet with twice the output channels (improved DDPM's learned variance, loaded by DDPMPipeline) crashed
    every sampler with a traceback, in `uncond sample` and `uncond evaluate` alike (trial 56 F7)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    config = {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}
    unet = UNet2DModel(**{**config, "in_channels": 1, "out_channels": 2})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="learned_range")).save_pretrained(tmp_path / "m")
    expected = f"{tmp_path / 'm'}: its UNet outputs 2 channels for 1 (a learned variance"
    for sampler in ("ddpm", "ddim"):
        code, _, err = run_cli("sample", tmp_path / "m", "--sampler", sampler, "--output_dir", tmp_path / "out")
        one_line_error(code, err, expected)
    one_line_error(*run_cli("evaluate", tmp_path / "m", "--reference", color_folder)[::2], expected)
    assert not (tmp_path / "out").exists()


def test_a_stop_while_a_models_weights_load_is_a_stop_from_the_hub_cache_too(run_cli, tmp_path, monkeypatch):
    """safetensors makes its tensors through torch from Rust: a SIGTERM's stop raised in there came out as its
    error, "could not load the Hub model", status 2 (bad input, not retried), for a model in the Hub's cache
    (its local folder's load was held already: trial 55 F2, trial 56 F4)."""
    import signal

    import huggingface_hub
    import safetensors.torch

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    save_tiny_pipeline(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    load_file = safetensors.torch.load_file

    def signalled_inside(*args, **kwargs):  # as the library does with an exception raised while it runs
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            return load_file(*args, **kwargs)
        except BaseException:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    sampling = ("--num_images", 1, "--steps", 1)
    monkeypatch.setattr(safetensors.torch, "load_file", signalled_inside)
    for model in ("someone/tiny", snapshot):
        code, _, err = run_cli("sample", model, *sampling, "--output_dir", tmp_path / "out")
        assert code == 143 and "could not load" not in err and "stopped by SIGTERM" in err, err
    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    code, _, err = run_cli("sample", "someone/tiny", *sampling, "--output_dir", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "000000.png").is_file(), err


@pytest.mark.parametrize("make_args, expected", [
    (lambda p, t: ["sample", t / "missing"], "no such folder (a Hub model id has the form owner/name)"),
    (lambda p, t: ["sample", t], "not a diffusers pipeline folder (no model_index.json)"),
    (lambda p, t: ["sample", "someone/some-model"], "someone/some-model: could not load the Hub model"),
    (lambda p, t: ["sample", p, "--grid", t / "grid.txt"], "--grid"),
    (lambda p, t: ["sample", p, "--device", "cuda:7" if not __import__("torch").cuda.is_available() else "nope"],
     "--device"),
    (lambda p, t: ["sample", p, "--steps", 0], "--steps is 0; it must be at least 1"),
    (lambda p, t: ["sample", p, "--steps", 1001], "1001 sampling steps with sde-dpmsolver++: the model was trained "
                                                  "with 1000 timesteps; use at most 1000 steps"),
    (lambda p, t: ["sample", p, "--seed", 2**70], "--seed is 1180591620717411303424; use a whole number from 0"),
    (lambda p, t: ["evaluate", p, "--reference", t / "missing.npz"], "no such statistics file"),
    (lambda p, t: ["evaluate", p, "--reference", t / "nowhere"], "--reference"),
    # an unset shell variable: sample and export wrote into the current folder, evaluate measured it (trial 64 F3)
    (lambda p, t: ["sample", p, "--output_dir", ""], "--output_dir is empty (an unset shell variable?)"),
    (lambda p, t: ["sample", ""], "MODEL is empty (an unset shell variable?)"),
    (lambda p, t: ["evaluate", p, "--reference", ""], "--reference is empty (an unset shell variable?)"),
    (lambda p, t: ["export", t, "--output_dir", ""], "--output_dir is empty (an unset shell variable?)"),
])
def test_bad_input_is_one_line(run_cli, pipeline, tmp_path, make_args, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*make_args(pipeline, tmp_path))
    one_line_error(code, err, expected)
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "model_index.json").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line(run_cli, pipeline, tiny_unet, color_folder, tmp_path,
                                                          monkeypatch):
    """A link to a folder that does not exist: export made the link's target (a new folder at the top of the disk),
    sample gave a traceback; a folder that check_creatable takes but the system refuses (a read-only mount, /proc
    for root) was a traceback after the model had loaded (trial 64 F4)."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere" / "deep")
    for args in (["sample", pipeline, "--output_dir", link], fast_train_args(color_folder, tiny_unet, link)):
        code, _, err = run_cli(*args)
        one_line_error(code, err, f"--output_dir {link}: a link to {tmp_path / 'nowhere' / 'deep'}, which does not "
                                  "exist (or a loop of links); choose another --output_dir")
    assert not (tmp_path / "nowhere").exists()
    refused = tmp_path / "read-only"
    mkdir = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", lambda self, *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))) if self == refused else mkdir(self, *args, **kwargs))
    code, _, err = run_cli("sample", pipeline, "--output_dir", refused, "--num_images", 1, "--steps", 1)
    one_line_error(code, err, f"--output_dir {refused}: cannot create it (Read-only file system)")


def test_evaluate_under_several_processes_points_to_sampling_on_them_first(run_cli, pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as `accelerate launch --num_processes 2` sets it
    code, _, err = run_cli("evaluate", pipeline, "--reference", tmp_path)
    one_line_error(code, err, "uncond evaluate runs as one process; to sample on several GPUs, run `accelerate "
                              "launch -m uncond sample MODEL --output_dir DIR`, then `uncond evaluate DIR`")


def test_sample_of_a_file_or_component_of_a_pipeline_names_the_pipeline_folder(run_cli, pipeline, tmp_path):
    run = shutil.copytree(pipeline, tmp_path / "run")  # a training run's export: its unet/ was taken for a
    (run / "training_config.json").write_text("{}")    # checkpoint's trained weights (they are the EMA's)
    for folder in pipeline, run:
        for inside, kind in (("model_index.json", "a file"), ("unet", "a component folder")):
            code, _, err = run_cli("sample", folder / inside)
            one_line_error(code, err, f"not a diffusers pipeline folder (no model_index.json) (it is {kind} of the "
                                      f"pipeline folder {folder}; pass that folder)")


def test_a_training_run_without_an_exported_pipeline_is_refused(run_cli, stand_in_inception, tmp_path):
    """Its sample grids and loss.png were measured as generated images, and sample called it no pipeline."""
    run = write_images(tmp_path / "run" / "samples", 4, nested=False).parent
    (run / "training_config.json").write_text("{}")
    (run / "samples" / "image_000.jpg").rename(run / "loss.png")
    reference = write_images(tmp_path / "real", 4)
    checkpoint = run / "checkpoint-12"
    for found, advice in (("training_config.json", ""), ("checkpoint-12", f"pass its checkpoint ({checkpoint}), or ")):
        code, _, err = run_cli("sample", run)
        one_line_error(code, err, f"{run}: a training run that has not exported a pipeline yet (it has {found}, "
                                  "no model_index.json; training exports it every --save_model_epochs epochs and "
                                  f"at the end): {advice}wait for the export")
        code, _, err = run_cli("evaluate", run, "--reference", reference)
        one_line_error(code, err, f"GENERATED {run}: a training run that has not exported a pipeline yet (it has "
                                  f"{found}, ")
        assert "or pass the folder of images to measure" in err
        for step in (3, 12):
            (run / f"checkpoint-{step}" / "unet").mkdir(parents=True, exist_ok=True)
            (run / f"checkpoint-{step}" / "training_config.json").write_text(json.dumps(TrainConfig().to_dict()))
    # checkpoints are models (test_a_checkpoint_is_sampled_and_measured_as_its_export); this one's is missing
    for args in (["sample", checkpoint], ["evaluate", checkpoint, "--reference", reference]):
        code, _, err = run_cli(*args)
        one_line_error(code, err, f"{checkpoint}: the checkpoint's unet/ has no config.json; use another checkpoint")
    code, _, err = run_cli("sample", run / "checkpoint-1")  # removed by --checkpoints_total_limit, say
    one_line_error(code, err, f"{run / 'checkpoint-1'}: no such folder ({run} holds checkpoint-3, checkpoint-12; "
                              "--checkpoints_total_limit removes a run's oldest checkpoints")
    code, _, err = run_cli("sample", run / "latest")  # as `uncond train --resume_from_checkpoint latest` says it
    one_line_error(code, err, f"{run / 'latest'}: no such folder (`latest` names a checkpoint for `uncond train` "
                              f"only; pass {run / 'checkpoint-12'})")
    (run / "checkpoint-12" / "samples").mkdir()
    code, _, err = run_cli("sample", run / "checkpoint-12" / "samples")
    one_line_error(code, err, f"(it is a folder of the checkpoint {run / 'checkpoint-12'}; pass that folder, or its "
                              "unet/ for the weights without EMA)")
    model = save_tiny_pipeline(tmp_path / "model")
    code, _, err = run_cli("evaluate", reference, "--reference", model)
    one_line_error(code, err, f"--reference {model}: a model; the reference is real images: pass a folder or dataset")
    (run / "checkpoint-3" / "training_config.json").unlink()  # as train_unconditional.py's checkpoints
    code, _, err = run_cli("sample", run / "checkpoint-3")  # and the run exported no pipeline beside it
    one_line_error(code, err, "(a train_unconditional.py checkpoint, which does not record its noise schedule, and "
                              f"its run's folder {run} holds no pipeline that would; resume it with "
                              f"`uncond train --resume_from_checkpoint {run / 'checkpoint-3'}`")
    for run_folder in (run, run / "checkpoint-12"):  # its grids and loss.png were measured as real images
        code, _, err = run_cli("evaluate", reference, "--reference", run_folder)
        one_line_error(code, err, f"--reference {run_folder}: a training run's output folder")


def test_float16_on_a_cpu_is_said_to_be_slow(run_cli, pipeline, tmp_path):
    code, _, err = run_cli("sample", pipeline, "--num_images", 1, "--steps", 1, "--device", "cpu", "--dtype",
                           "float16", "--output_dir", tmp_path / "out")
    assert code == 0 and "--dtype float16 on a CPU is emulated and slow" in err


def test_sample_makes_the_grid_folder(run_cli, pipeline, tmp_path):
    grid = tmp_path / "new" / "grid.png"  # it failed after all the sampling
    assert run_cli("sample", pipeline, "--num_images", 2, "--steps", 1, "--output_dir", tmp_path / "out",
                   "--grid", grid)[0] == 0
    assert Image.open(grid).size[0] > 16


def test_sample_from_inside_a_run_folder_stays_out_of_its_previews(run_cli, pipeline, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pipeline, run)  # an exported run: the pipeline, its training_config.json and preview grids
    (run / "training_config.json").write_text("{}")
    (run / "samples").mkdir()
    monkeypatch.chdir(run)
    code, _, err = run_cli("sample", ".", "--num_images", 2, "--steps", 1)  # the default --output_dir samples
    one_line_error(code, err, f"--output_dir samples is the preview folder of the training run in {run}; choose "
                              "another --output_dir")
    assert not list((run / "samples").iterdir())
    code, _, err = run_cli("sample", ".", "--num_images", 2, "--steps", 1, "--output_dir", ".")  # the run itself
    one_line_error(code, err, "--output_dir . holds a model (a pipeline, a checkpoint or its weights, or a training "
                              "run); choose another")
    checkpoint = run / "checkpoint-2"  # train_unconditional.py's: no training_config.json, as its unet/ has none
    shutil.copytree(run / "unet", checkpoint / "unet")
    for weights in (checkpoint, checkpoint / "unet"):
        code, _, err = run_cli("sample", ".", "--num_images", 2, "--steps", 1, "--output_dir", weights)
        one_line_error(code, err, f"--output_dir {weights} holds a model")
    code, _, err = run_cli("sample", ".", "--num_images", 2, "--steps", 1, "--output_dir", "unet")  # among its files
    one_line_error(code, err, f"--output_dir unet is the unet folder of the pipeline in {run}; choose another")
    assert {path.name for path in (run / "unet").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert run_cli("sample", ".", "--num_images", 2, "--steps", 1, "--output_dir", "generated")[0] == 0


def test_evaluate_measures_the_numbered_images_of_a_sample_folder_and_skips_unreadable_ones(
        run_cli, stand_in_inception, pipeline, tmp_path):
    out = tmp_path / "samples"
    assert run_cli("sample", pipeline, "--num_images", 3, "--steps", 1, "--output_dir", out,
                   "--grid", out / "grid.png")[0] == 0
    code, stdout, err = run_cli("evaluate", out, "--reference", out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["num_generated"] == 3 and "the numbered images of the folder" in result["generated"]
    assert result["num_reference"] == 3  # as --reference too: its grid.png was measured as a fourth image
    # the same keys whatever was computed, for scripts: scores left out are null, and so is how a folder was sampled
    assert list(result) == ["fid", "kid", "kid_std", "precision", "recall", "num_generated", "num_reference", "note",
                            "resolution", "sampler", "steps", "seed", "generated", "reference", "features"]
    assert result["kid"] is None and "KID and precision/recall need more than 3 images" in result["note"]
    assert result["resolution"] == 16 and result["sampler"] is None
    (out / "000000.png").write_text("not an image")  # the first file: it set the native size, and crashed
    code, stdout, err = run_cli("evaluate", out, "--reference", write_images(tmp_path / "real", 4), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["num_generated"] == 2 and "1 unreadable image skipped" in result["generated"]
    assert result["generated"].startswith("3 image files from")  # "3 images", of which 2 were measured


def test_a_checkpoint_is_exported_as_the_model_to_deliver(run_cli, tiny_unet, tmp_path):
    """Picking a run's best checkpoint left no way to make it the model: re-running training to that step wrote a
    card of the re-run's settings (the defaults), and in the run's own folder set its later checkpoints aside."""
    run, images = tmp_path / "run", write_images(tmp_path / "real", 8)
    args = fast_train_args(images, tiny_unet, run, "--checkpointing_steps", "2", "--use_ema", "--logging_steps", "1",
                           "--save_images_epochs", "1")
    assert run_cli(*args, "--max_train_steps", "2", "--learning_rate", "1e-3")[0] == 0
    assert run_cli(*args, "--max_train_steps", "4", "--learning_rate", "5e-4")[0] == 0  # went on, other settings
    code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", tmp_path / "best")
    assert code == 0 and f"exported the checkpoint {run / 'checkpoint-2'} (EMA weights), trained 2 steps" in err, err
    best = tmp_path / "best"
    exported = load_file(best / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(run / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[name], ema[name]) for name in ema)
    # the EMA's own settings are not the UNet's: every load of the export warned of them
    assert json.loads((best / "unet" / "config.json").read_text()).keys() == \
        json.loads((run / "unet" / "config.json").read_text()).keys()
    card = (best / "README.md").read_text()
    assert "| learning rate | 0.001 (cosine, 1 warmup steps) |" in card and "| optimizer steps | 2 |" in card
    assert "samples/step-0000002.png" in card and f"uncond export {run / 'checkpoint-2'} --output_dir {best}" in card
    assert [record["step"] for record in map(json.loads, (best / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert type(DiffusionPipeline.from_pretrained(best)).__name__ == "DDPMPipeline"
    sample = ["--num_images", 2, "--steps", 2]
    assert run_cli("sample", best, "--output_dir", tmp_path / "from-export", *sample)[0] == 0
    assert run_cli("sample", run / "checkpoint-2", "--output_dir", tmp_path / "from-checkpoint", *sample)[0] == 0
    assert all((a == b).all() for a, b in zip(pixels(tmp_path / "from-export"), pixels(tmp_path / "from-checkpoint"),
                                              strict=True))
    # never over a folder of other files, a run's, or an earlier export without --overwrite_output_dir
    code, _, err = run_cli("export", run / "checkpoint-4", "--output_dir", best)
    one_line_error(code, err, f"--output_dir {best} is not empty; pass --overwrite_output_dir")
    code, _, err = run_cli("export", run / "checkpoint-4", "--output_dir", best, "--overwrite_output_dir")
    assert code == 0 and "samples/step-0000004.png" in (best / "README.md").read_text(), err
    assert not (best / "samples" / "step-0000002.png").exists()
    code, _, err = run_cli("export", run / "checkpoint-4", "--output_dir", run)
    one_line_error(code, err, f"--output_dir {run} is a training run's folder (it has checkpoints)")
    code, _, err = run_cli("export", run / "checkpoint-4", "--output_dir", run / "best")  # --keep_best's, say
    one_line_error(code, err, f"--output_dir {run / 'best'} is inside the training run's folder {run}, whose runs "
                              "would replace or remove it")
    # a training run into the export is refused, as into any trained model (it was taken for one interrupted)
    code, _, err = run_cli(*args[:args.index("--output_dir")], "--output_dir", best,
                           *args[args.index("--output_dir") + 2:], "--max_train_steps", "1")
    one_line_error(code, err, f"--output_dir {best} already holds a trained model")
    code, _, err = run_cli("train", "--config", best / "training_config.json")  # its record is the export's, too
    one_line_error(code, err, f"--output_dir {best} already holds a trained model")
    code, _, err = run_cli("export", run, "--output_dir", tmp_path / "other")
    one_line_error(code, err, f"{run}: not a training checkpoint")
    plain = save_tiny_pipeline(tmp_path / "plain")  # diffusers' own (it was taken for a seed script's checkpoint)
    named = shutil.copytree(run, tmp_path / "copies" / "checkpoint-9", ignore=shutil.ignore_patterns("checkpoint-*"))
    for pipeline in (plain, named):  # an export named as a checkpoint was said to be an incomplete one (trial 67 F3)
        code, _, err = run_cli("export", pipeline, "--output_dir", tmp_path / "other")
        one_line_error(code, err, f"{pipeline}: not a training checkpoint")
        assert "a pipeline folder is a model already" in err, err
    code, _, err = run_cli(*args, "--resume_from_checkpoint", named)
    one_line_error(code, err, f"--resume_from_checkpoint {named} is a pipeline folder (an export")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = run_cli("export", run / "checkpoint-4", "--output_dir", tmp_path / "mine", "--overwrite_output_dir")
    one_line_error(code, err, "holds notes.txt, which no export wrote")
    seed_checkpoint = tmp_path / "seed-run" / "checkpoint-4"  # train_unconditional.py's: no training_config.json
    shutil.copytree(run / "checkpoint-4", seed_checkpoint, ignore=shutil.ignore_patterns("training_config.json"))
    code, _, err = run_cli("export", seed_checkpoint, "--output_dir", tmp_path / "from-seed")
    one_line_error(code, err, "(a train_unconditional.py checkpoint, which does not record its noise schedule, and "
                              f"its run's folder {seed_checkpoint.parent} holds no pipeline that would; resume it "
                              f"with `uncond train --resume_from_checkpoint {seed_checkpoint}`")


def test_a_checkpoint_of_an_earlier_uncond_is_exported_and_a_failed_export_leaves_nothing(run_cli, tiny_unet,
                                                                                           tmp_path, monkeypatch):
    """Checkpoints of earlier versions of uncond record no commands: their export crashed with a traceback, after
    writing a pipeline whose state said finished, with no card; the re-run was then refused (not empty). And an
    export that failed replacing an earlier one (--overwrite_output_dir) took it with it."""
    from uncond import checkpoint_export

    run, images = tmp_path / "run", write_images(tmp_path / "real", 8)
    assert run_cli(*fast_train_args(images, tiny_unet, run, "--max_train_steps", "2"))[0] == 0
    state_file = run / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    del state["commands"]
    state_file.write_text(json.dumps(state))
    write_manifest(run / "checkpoint-2", 2)  # as the earlier version wrote it
    failing = tmp_path / "new" / "deep" / "failing"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_export, "write_card_of", lambda *args, **kwargs: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run_cli("export", run / "checkpoint-2", "--output_dir", failing)
    assert not (tmp_path / "new").exists()  # no half export that would pass for the model, no folders made for it
    code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", failing)
    assert code == 0, err
    card = (failing / "README.md").read_text()
    assert "The commands that trained it are not recorded (it was trained by an earlier version of uncond)" in card
    assert f"--output_dir {failing}`" in card and f'from_pretrained("{failing}")' in card  # not where written
    before = {path.relative_to(failing): path.read_bytes() for path in failing.rglob("*") if path.is_file()}
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_export, "write_card_of", lambda *args, **kwargs: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run_cli("export", run / "checkpoint-2", "--output_dir", failing, "--overwrite_output_dir")
    assert {path.relative_to(failing): path.read_bytes() for path in failing.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in failing.parent.iterdir()) == ["failing"]  # nothing left beside it
    code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", failing, "--overwrite_output_dir")
    assert code == 0 and (failing / "README.md").read_text() == card, err
    # killed between moving the earlier export out and the new one in: the next export puts the earlier one back
    # (not a mix of the two), and removes what a killed export was writing; that folder was refused as holding
    # items "no export wrote" (no model_index.json), with --overwrite_output_dir too, and kept its mix
    def killed_while_moving_in():
        aside = failing.parent / ".failing.replaced-999999999"
        aside.mkdir()
        for item in failing.iterdir():
            item.rename(aside / item.name)
        (failing / "unet").mkdir()  # the new export's first item moved in
        (failing.parent / ".failing.exporting-999999999").mkdir()

    killed_while_moving_in()
    code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", failing)
    one_line_error(code, err, f"--output_dir {failing} is not empty; pass --overwrite_output_dir to replace the model")
    assert {path.relative_to(failing): path.read_bytes() for path in failing.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in failing.parent.iterdir()) == ["failing"]
    killed_while_moving_in()
    (failing / "notes.txt").write_text("mine")  # put there since: kept, and named
    code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", failing, "--overwrite_output_dir")
    one_line_error(code, err, f"--output_dir {failing} holds notes.txt, which no export wrote")
    assert (failing / "notes.txt").read_text() == "mine" and (failing / "model_index.json").is_file()
    (failing / "notes.txt").unlink()
    assert {path.relative_to(failing): path.read_bytes() for path in failing.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in failing.parent.iterdir()) == ["failing"]
    # --output_dir . (a new, empty working folder): the folder was renamed away and deleted, the export made anew
    here = tmp_path / "here"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", ".")
    assert code == 0 and here.stat().st_ino == inode and (here / "model_index.json").is_file(), err
    assert json.loads((here / "training_config.json").read_text())["output_dir"] == str(here)  # as runs record it
    # another export finished into the same new folder meanwhile: refused, not silently replaced
    other = tmp_path / "other"
    write_card_of = checkpoint_export.write_card_of

    def another_export_meanwhile(*args, **kwargs):
        write_card_of(*args, **kwargs)
        (other / "model_index.json").write_text("{}")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_export, "write_card_of", another_export_meanwhile)
        code, _, err = run_cli("export", run / "checkpoint-2", "--output_dir", other)
    one_line_error(code, err, f"--output_dir {other}: another export wrote a model there meanwhile; pass "
                              "--overwrite_output_dir to replace it")
    assert [path.name for path in other.iterdir()] == ["model_index.json"]


def test_a_train_unconditional_checkpoint_is_sampled_and_exported_with_its_runs_schedule(run_cli, tiny_unet,
                                                                                           tmp_path):
    """train_unconditional.py's checkpoints record no noise schedule, so neither `uncond sample` nor `uncond export`
    took them: the pipeline that script exports into the checkpoints' folder at each --save_model_epochs has it."""
    run, images = tmp_path / "run", write_images(tmp_path / "real", 8)
    args = fast_train_args(images, tiny_unet, run, "--checkpointing_steps", "2", "--use_ema", "--max_train_steps", "4",
                           "--ddpm_num_steps", "200", "--ddpm_beta_schedule", "squaredcos_cap_v2")
    assert run_cli(*args)[0] == 0
    # the seed script's layout: its pipeline (the export at the end of an epoch), and beside it checkpoints of
    # accelerate's files with unet/ and unet_ema/, without uncond's manifest and settings
    seed_run = tmp_path / "seed-run"
    seed_run.mkdir()
    for name in ("model_index.json", "unet", "scheduler"):
        shutil.copytree(run / name, seed_run / name) if (run / name).is_dir() else shutil.copy(run / name, seed_run)
    seed_checkpoint = seed_run / "checkpoint-2"
    shutil.copytree(run / "checkpoint-2", seed_checkpoint,
                    ignore=shutil.ignore_patterns("training_config.json", "training_state.json", "manifest.json"))
    assert not (seed_checkpoint / "training_config.json").exists() and (seed_checkpoint / "optimizer.bin").is_file()

    code, _, err = run_cli("sample", seed_checkpoint, "--num_images", "2", "--steps", "3", "--output_dir",
                           tmp_path / "seed-samples")
    assert code == 0, err
    code, _, err = run_cli("sample", run / "checkpoint-2", "--num_images", "2", "--steps", "3", "--output_dir",
                           tmp_path / "uncond-samples")
    assert code == 0, err
    assert "Casting" not in err  # diffusers' note on casting the EMA's UNet, rebuilt without the EMA's settings
    (tmp_path / "link").symlink_to(seed_checkpoint)  # its run's folder is the one it is in, not the link's
    code, _, err = run_cli("sample", tmp_path / "link", "--num_images", "2", "--steps", "3", "--output_dir",
                           tmp_path / "linked-samples")
    assert code == 0, err
    for name in ("000000.png", "000001.png"):  # the same weights (EMA) and schedule (200 cosine steps)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "seed-samples" / name)),
                              np.asarray(Image.open(tmp_path / "uncond-samples" / name)))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "seed-samples" / name)),
                              np.asarray(Image.open(tmp_path / "linked-samples" / name)))

    exported = tmp_path / "from-seed"
    code, _, err = run_cli("export", seed_checkpoint, "--output_dir", exported)
    assert code == 0 and f"exported the checkpoint {seed_checkpoint} (EMA weights), trained 2 steps by " \
                         "train_unconditional.py" in err and "the pipeline only" in err, err
    pipeline = DiffusionPipeline.from_pretrained(exported)
    assert pipeline.scheduler.config.num_train_timesteps == 200
    assert pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    weights = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_file(run / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[name], ema[name]) for name in ema)
    assert not (exported / "README.md").exists() and not (exported / "training_config.json").exists()


def test_a_checkpoint_of_a_branch_left_behind_is_exported_with_its_whole_history(run_cli, tiny_unet, tmp_path):
    """RUN/abandoned-after-step-2/checkpoint-4's export had the metrics of steps 3 and 4 only: those of the steps
    before the branch point stay in the run's own metrics.jsonl."""
    run, images = tmp_path / "run", write_images(tmp_path / "real", 8)
    args = fast_train_args(images, tiny_unet, run, "--checkpointing_steps", "2", "--logging_steps", "1",
                           "--max_train_steps", "4")
    assert run_cli(*args)[0] == 0
    assert run_cli(*args, "--resume_from_checkpoint", "checkpoint-2", "--learning_rate", "5e-5")[0] == 0
    branch = run / "abandoned-after-step-2" / "checkpoint-4"
    code, _, err = run_cli("export", branch, "--output_dir", tmp_path / "branch")
    assert code == 0, err
    logged = [json.loads(line) for line in (tmp_path / "branch" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged] == [1, 2, 3, 4]
    assert logged[-1] == json.loads((branch.parent / "metrics.jsonl").read_text().splitlines()[-1])


def test_a_checkpoint_is_sampled_and_measured_as_its_export(run_cli, stand_in_inception, tiny_unet, tmp_path):
    """A checkpoint could not be sampled at all: a run stopped before its first export left no model to look at."""
    run, images = tmp_path / "run", write_images(tmp_path / "real", 4)
    assert run_cli(*fast_train_args(images, tiny_unet, run, "--max_train_steps", "2", "--checkpointing_steps", "2",
                                    "--use_ema"))[0] == 0
    sample = ["--num_images", 3, "--steps", 2, "--batch_size", 3]
    code, _, err = run_cli("sample", run / "checkpoint-2", "--output_dir", tmp_path / "from-checkpoint", *sample)
    assert code == 0 and f"the checkpoint {run / 'checkpoint-2'} (EMA weights)" in err, err
    code, _, err = run_cli("sample", run, "--output_dir", tmp_path / "from-export", *sample)
    assert code == 0 and f"the pipeline folder {run} (DDPMPipeline, trained 2 steps)" in err, err  # a live run's
    for name in ("000000.png", "000002.png"):  # the export at step 2 holds the EMA weights of checkpoint-2
        assert (np.asarray(Image.open(tmp_path / "from-checkpoint" / name)) ==
                np.asarray(Image.open(tmp_path / "from-export" / name))).all()
    # its unet/ (the trained weights, without EMA) and unet_ema/ can be named
    for weights, kind in (("unet", "trained"), ("unet_ema", "EMA")):
        code, _, err = run_cli("sample", run / "checkpoint-2" / weights, "--output_dir", tmp_path / weights, *sample)
        assert code == 0 and f"the checkpoint {run / 'checkpoint-2'} ({kind} weights)" in err, err
    same = [[(a == b).all() for a, b in zip(pixels(tmp_path / weights), pixels(tmp_path / "from-checkpoint"),
                                             strict=True)] for weights in ("unet_ema", "unet")]
    assert all(same[0]) and not any(same[1])
    # the same model, so the same settings: either continues a folder the other began (it was refused: the
    # samplers' recorded configurations differed in settings no sampler reads)
    for model, folder in ((run, "from-checkpoint"), (run / "checkpoint-2", "from-export")):
        code, _, err = run_cli("sample", model, "--output_dir", tmp_path / folder, *sample[:1], 4, *sample[2:])
        assert code == 0 and "already holds 3 of the 4 images of these settings" in err, err
    code, stdout, err = run_cli("evaluate", run / "checkpoint-2", "--reference", images, "--num_images", 4,
                                "--steps", 2, "--json")
    assert code == 0 and json.loads(stdout)["num_generated"] == 4, err
    assert {key: json.loads(stdout)[key] for key in ("sampler", "steps", "seed")} == \
        {"sampler": "sde-dpmsolver++", "steps": 2, "seed": 0}
    # its unet_ema/ named is measured as the checkpoint is (it was taken for a folder of images: "holds no image
    # files"; trial 60 F4)
    code, named, err = run_cli("evaluate", run / "checkpoint-2" / "unet_ema", "--reference", images, "--num_images",
                               4, "--steps", 2, "--json")
    assert code == 0 and json.loads(named)["fid"] == json.loads(stdout)["fid"], err


def test_a_damaged_checkpoint_is_refused_in_one_line_before_it_is_sampled(run_cli, tiny_unet, tmp_path, monkeypatch):
    """Bytes of a checkpoint's weights damaged in place (the file as long as before) loaded as NaN weights and
    sampling wrote black images without a word; with its unet_ema/ gone, the trained weights were sampled as if
    the run had kept no EMA; a noise schedule changed in its training_config.json was sampled with (trial 60 F5,
    F9, trial 62 F1). Its manifest tells each, before any weight is read."""
    run, images = tmp_path / "run", write_images(tmp_path / "real", 4)
    assert run_cli(*fast_train_args(images, tiny_unet, run, "--max_train_steps", "2", "--use_ema"))[0] == 0
    saved = run / "checkpoint-2"
    sample = ["--num_images", 2, "--steps", 2, "--output_dir", tmp_path / "samples"]
    with monkeypatch.context() as inside:  # `.` in its unet_ema/ (taken for a pipeline folder; trial 62 F4)
        inside.chdir(saved / "unet_ema")
        code, _, err = run_cli("sample", ".", *sample[:-1], tmp_path / "from-inside")
        assert code == 0 and f"the checkpoint {saved} (EMA weights)" in err, err
    for name, damage in (("manifest.json", lambda text: json.dumps({"files": dict.fromkeys(json.loads(text)["files"],
                                                                                          "edited")})),
                         ("training_config.json", lambda text: text.replace('"ddpm_num_steps": 1000',
                                                                             '"ddpm_num_steps": 9000'))):
        whole = (saved / name).read_text()
        (saved / name).write_text(damage(whole))
        code, _, err = run_cli("sample", saved, *sample)
        one_line_error(code, err, f"{saved}: the checkpoint's {name} " + (
            "cannot be read" if name == "manifest.json" else "is missing or differs from its manifest.json"))
        (saved / name).write_text(whole)
    weights = saved / "unet" / "diffusion_pytorch_model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-400:-100] = b"\xff" * 300  # NaN float32s
    weights.write_bytes(bytes(damaged))
    code, _, err = run_cli("sample", saved / "unet", *sample)
    one_line_error(code, err, f"{saved / 'unet'}: the checkpoint's unet/{weights.name} is missing or differs from "
                   "its manifest.json (damaged or changed since it was written); use another checkpoint")
    assert not (tmp_path / "samples").exists()
    code, _, err = run_cli("sample", saved, *sample)  # its EMA weights, updated at its step, are whole
    assert code == 0, err
    shutil.rmtree(saved / "unet_ema")
    code, _, err = run_cli("sample", saved, *sample[:-1], tmp_path / "again")
    one_line_error(code, err, "the checkpoint's unet_ema/config.json is missing or differs from its manifest.json")


def test_evaluate_refuses_a_runs_sample_grids_as_samples(run_cli, tmp_path):
    """A run's samples/ folder was measured as GENERATED: grids of 16 small samples each, at the grid's size."""
    run, real = tmp_path / "run", write_images(tmp_path / "real", 2)
    write_images(run / "samples", 2)
    (run / "training_config.json").write_text("{}")
    for args, name in ((["evaluate", run / "samples", "--reference", real], "GENERATED"),
                       (["evaluate", real, "--reference", run / "samples"], "--reference")):
        code, _, err = run_cli(*args)
        one_line_error(code, err, f"{name} {run / 'samples'}: the sample grids of a training run")


def test_evaluate_says_why_kid_and_precision_recall_are_missing_with_few_images(run_cli, stand_in_inception,
                                                                               tmp_path):
    reference = write_images(tmp_path / "real", 5, seed=1)
    note = "KID and precision/recall need more than 3 images per set"
    code, out, err = run_cli("evaluate", write_images(tmp_path / "three", 3), "--reference", reference, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["note"].startswith(note) and result["fid"] is not None
    assert result["kid"] is result["precision"] is None
    assert "; FID of 3 images is biased upwards (fewer than its" in result["note"]
    code, out, err = run_cli("evaluate", tmp_path / "three", "--reference", reference)
    assert code == 0 and "FID " in out and note in out, err
    code, out, err = run_cli("evaluate", write_images(tmp_path / "four", 4), "--reference", reference, "--json")
    assert code == 0 and json.loads(out)["kid"] is not None, err
    assert json.loads(out)["note"] == ("FID of 4 images is biased upwards (fewer than its 8 feature dimensions): "
                                       "compare FIDs of equal image counts")  # the stand-in's 8 features


def test_evaluate_says_which_set_is_too_small_or_unreadable_before_measuring_the_other(
        run_cli, stand_in_inception, tmp_path, monkeypatch):
    from uncond import metrics

    reference, measured = write_images(tmp_path / "reference", 6), []
    extract = metrics.extract_features
    monkeypatch.setattr(metrics, "extract_features", lambda *args: measured.append(1) or extract(*args))
    code, _, err = run_cli("evaluate", write_images(tmp_path / "one", 1), "--reference", reference)
    one_line_error(code, err, f"GENERATED {tmp_path / 'one'}: 1 image; FID needs at least 2")
    assert not measured  # the whole reference set was measured first
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    for name in ("a.png", "b.png"):
        (unreadable / name).write_text("not an image")
    code, _, err = run_cli("evaluate", reference, "--reference", unreadable)
    one_line_error(code, err, f"--reference {unreadable}: 0 readable images; 2 unreadable images skipped")
    code, _, err = run_cli("evaluate", unreadable, "--reference", reference)
    one_line_error(code, err, f"GENERATED {unreadable}: none of its 2 image files can be read")


def test_evaluate_refuses_a_reference_of_one_image_and_caches_nothing(run_cli, stand_in_inception, pipeline,
                                                                      tmp_path, decoded_image_cache):
    code, _, err = run_cli("evaluate", write_images(tmp_path / "generated", 3),
                           "--reference", write_images(tmp_path / "one", 1))
    one_line_error(code, err, "--reference")
    assert "1 readable image; FID needs at least 2" in err
    assert not list(decoded_image_cache.rglob("*.npz"))


def test_a_mistyped_relative_folder_is_not_looked_up_on_the_hub(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in ("runs/exp1", "samples/"):
        code, _, err = run_cli("sample", typo)
        one_line_error(code, err, f"{typo}: no such folder")


def test_evaluate_without_inception_weights_says_where_to_put_them(run_cli, no_inception_weights, tmp_path):
    images = write_images(tmp_path / "images", 4)
    code, _, err = run_cli("evaluate", images, "--reference", images)
    one_line_error(code, err, "FID needs the Inception weights file pt_inception-2015-12-05-6726825d.pth, which is "
                              "not on this machine (offline: HF_HUB_OFFLINE is set): download https://github.com/"
                              "mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d"
                              f".pth and put it at {no_inception_weights}, or pass --inception_weights PATH")
    # without torch-fidelity too: both said at once (the second came out only once the first was mended)
    from uncond import metrics

    def no_torch_fidelity():
        raise UsageError("FID needs torch-fidelity's InceptionV3 network: pip install --no-deps torch-fidelity")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "torch_fidelity_inception", no_torch_fidelity)
        code, _, err = run_cli("evaluate", images, "--reference", images)
    one_line_error(code, err, "FID needs torch-fidelity's InceptionV3 network: pip install --no-deps torch-fidelity; "
                              "and FID needs the Inception weights file pt_inception-2015-12-05-6726825d.pth")
    (tmp_path / "old-checkpoint" / "unet").mkdir(parents=True)  # a model that cannot be sampled is said first
    code, _, err = run_cli("evaluate", tmp_path / "old-checkpoint", "--reference", images)
    one_line_error(code, err, "a train_unconditional.py checkpoint, which does not record its noise schedule")


def test_evaluate_a_folder_against_itself_and_its_cached_statistics(run_cli, stand_in_inception, tmp_path):
    images = write_images(tmp_path / "images", 10, size=(20, 24))
    code, out, err = run_cli("evaluate", images, "--reference", images, "--resolution", "16", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert abs(result["fid"]) < 1e-6 and result["precision"] == result["recall"] == 1.0
    assert result["num_generated"] == result["num_reference"] == 10
    assert "centre-cropped to 16x16" in result["reference"] and "statistics cached in" in result["reference"]
    cached = Path(result["reference"].split("statistics cached in ")[1])
    assert cached.suffix == ".npz" and "tiny stand-in" in result["features"]

    code, out, _ = run_cli("evaluate", images, "--reference", images, "--resolution", "16", "--json")
    assert "read from the cache" in json.loads(out)["reference"]
    (tmp_path / "other.pth").write_bytes(b"other weights")
    code, out, _ = run_cli("evaluate", images, "--reference", images, "--resolution", "16", "--json",
                           "--inception_weights", tmp_path / "other.pth")
    assert "statistics cached in" in json.loads(out)["reference"]  # not those of the other weights
    code, out, err = run_cli("evaluate", images, "--reference", cached, "--resolution", "16")
    assert code == 0, err
    assert "FID 0.000" in out and "KID" in out and "resized (shorter side to 16 px" in out
    assert "(10 images at 16 px; with features)" in out
    # statistics uncond wrote record what they were computed from: others would give a wrong FID without a word
    code, _, err = run_cli("evaluate", images, "--reference", cached, "--resolution", "8")
    one_line_error(code, err, f"--reference {cached}: its statistics are of images at 16 px, and this evaluation "
                              "measures at 8 px; pass --resolution 16, or the images themselves as --reference")
    code, _, err = run_cli("evaluate", images, "--reference", cached, "--resolution", "16",
                           "--inception_weights", tmp_path / "other.pth")
    one_line_error(code, err, f"--reference {cached}: its statistics were computed with other Inception weights")
    with np.load(cached) as stats:  # as pytorch-fid writes them: mu and sigma alone
        np.savez(tmp_path / "pytorch_fid.npz", mu=stats["mu"], sigma=stats["sigma"])
    code, out, err = run_cli("evaluate", images, "--reference", tmp_path / "pytorch_fid.npz", "--resolution", 16,
                             "--json")
    assert code == 0, err
    fid_only = json.loads(out)
    assert abs(fid_only["fid"]) < 1e-6 and fid_only["kid"] is None and fid_only["num_reference"] is None
    assert "mu and sigma only: FID alone" in fid_only["reference"]


def test_reference_statistics_are_measured_anew_when_the_images_or_their_number_change(run_cli, stand_in_inception,
                                                                                       tmp_path):
    """Statistics cached for a folder are read back only for the same images at the same count: a folder with
    images added, or more of them allowed, gave the FID against the stale statistics."""
    generated, real = write_images(tmp_path / "generated", 6), write_images(tmp_path / "real", 6, seed=1)

    def reference(*extra) -> str:
        code, out, err = run_cli("evaluate", generated, "--reference", real, "--resolution", 16, "--json", *extra)
        assert code == 0, err
        return json.loads(out)["reference"]

    assert "statistics cached in" in reference("--reference_num_images", 4)
    assert "read from the cache" in reference("--reference_num_images", 4)
    assert reference("--reference_num_images", 5).startswith("5 images") and "cached in" in reference()
    write_images(real / "more", 2, seed=2)
    assert reference().startswith("8 images")
    assert "read from the cache" not in reference("--reference_num_images", 4)  # 4 chosen from other images


def test_evaluate_samples_of_a_model_against_builtin_digits(run_cli, stand_in_inception, tmp_path):
    model = save_tiny_pipeline(tmp_path / "gray", channels=1)
    args = ("evaluate", model, "--reference", "builtin:mnist", "--reference_num_images", 30, "--num_images", 6,
            "--steps", 2, "--json")
    code, out, err = run_cli(*args)
    assert code == 0, err
    untrained = json.loads(out)
    assert untrained["num_generated"] == 6 and untrained["num_reference"] == 30
    assert "sampled from the pipeline folder" in untrained["generated"] and "16x16" in untrained["generated"]
    assert "builtin:mnist" in untrained["reference"] and "centre-cropped to 16x16" in untrained["reference"]
    digits = write_digits(tmp_path / "digits", 6)
    code, out, err = run_cli("evaluate", digits, "--reference", "builtin:mnist", "--reference_num_images", 30,
                             "--resolution", 16, "--json")
    assert code == 0, err
    assert json.loads(out)["fid"] < untrained["fid"]  # real digits are closer to digits than noise is


def test_a_non_square_model_measures_as_the_folder_of_its_samples(run_cli, stand_in_inception, tmp_path):
    """Any diffusers pipeline may have a (height, width) sample size: its samples were measured whole, while
    the same samples in a folder were centre-cropped as every folder's images are (another FID)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**{**{k: v for k, v in TINY_UNET.items() if not k.startswith("_")}, "sample_size": (16, 24)})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "wide")
    sampling = ("--num_images", 4, "--steps", 2, "--batch_size", 4)
    assert run_cli("sample", tmp_path / "wide", *sampling, "--output_dir", tmp_path / "samples")[0] == 0
    assert Image.open(tmp_path / "samples" / "000000.png").size == (24, 16)
    real = write_images(tmp_path / "real", 4)
    results = []
    for generated in (tmp_path / "wide", tmp_path / "samples"):
        code, out, err = run_cli("evaluate", generated, *sampling, "--reference", real, "--json")
        assert code == 0, err
        results.append(json.loads(out))
    assert "at the model's 24x16 px, resized (shorter side to 16 px" in results[0]["generated"]
    assert results[0]["fid"] == pytest.approx(results[1]["fid"], rel=1e-6)


def test_evaluate_compares_a_model_at_another_resolution(run_cli, stand_in_inception, pipeline, tmp_path):
    """The model's own samples (16 px) as the reference, both sides compared at 8 px: the same images."""
    sampling = ("--num_images", 6, "--steps", 2, "--seed", 3, "--batch_size", 6)
    assert run_cli("sample", pipeline, *sampling, "--output_dir", tmp_path / "samples")[0] == 0
    code, out, err = run_cli("evaluate", pipeline, *sampling, "--reference", tmp_path / "samples", "--resolution", 8,
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert "at the model's 16x16 px, resized (shorter side to 8 px" in result["generated"]
    assert abs(result["fid"]) < 1e-6


def write_digits(folder: Path, count: int) -> Path:
    from uncond.sources import builtin_mnist

    folder.mkdir()
    records = builtin_mnist().records
    for index in range(len(records) - count, len(records)):
        records[index].open().save(folder / f"{index}.png")
    return folder


def test_training_evaluations_with_other_inception_weights_say_so(run_cli, color_folder, tiny_unet, tmp_path,
                                                                    monkeypatch):
    """`uncond evaluate` says that such scores are not comparable with published FID; training logged them bare."""
    import dataclasses

    import uncond.metrics
    from conftest import make_tiny_extractor

    note = "a stand-in. NOT the standard FID weights: x.pth's SHA-256 begins 0123abcd; these scores are not comparable"
    monkeypatch.setattr(uncond.metrics, "inception_extractor", lambda weights, device: dataclasses.replace(
        make_tiny_extractor(weights), input_note=note))
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "2",
                                            "--eval_every_steps", "2", "--eval_num_images", "4"))
    assert code == 0 and err.count("--eval_every_steps: NOT the standard FID weights: x.pth's SHA-256 begins") == 1


@pytest.mark.parametrize("during", ["sampling", "reference statistics"])
def test_a_stop_during_an_evaluation_gives_it_up(run_cli, stand_in_inception, color_folder, tiny_unet, tmp_path,
                                                 monkeypatch, during):
    """It ran to its end (minutes the first time: the training images are measured too), past the 30 s after
    which launchers kill a stopping run, so no checkpoint was saved."""
    import os
    import signal

    from uncond import data, sampling, tracking

    name, module = ("sample_batches", sampling) if during == "sampling" else ("centre_crops", data)
    original = getattr(module, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)
    out, straight = tmp_path / "run", tmp_path / "straight"
    args = ("--max_train_steps", "4", "--eval_every_steps", "2", "--eval_num_images", "4")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *args))
    assert code == 143, err
    assert "the evaluation of step 2 is left out: the run is stopping" in err and "evaluation at step" not in err
    assert "stopped by SIGTERM at step 2, checkpoint-2 saved" in err and not (out / "fid_reference.npz").exists()
    monkeypatch.setattr(module, name, original)
    # The resume makes it first; stopped again right after it, before a new checkpoint, the next resume is owed
    # it still, but does not make it again (it takes minutes): metrics.jsonl holds it once.
    write = tracking.MetricsFile.write

    def stop_after_evaluation(self, values):
        write(self, values)
        if "fid" in values:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.MetricsFile, "write", stop_after_evaluation)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *args))
    assert code == 143 and "evaluation at step 2" in err and "stopped by SIGTERM at step 2" in err, err
    monkeypatch.setattr(tracking.MetricsFile, "write", write)
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *args))
    assert code == 0 and "the evaluation of step 2 was made by an earlier resume" in err, err
    assert "evaluation at step 2" not in err and "evaluation at step 4" in err
    assert run_cli(*fast_train_args(color_folder, tiny_unet, straight, *args))[0] == 0
    scores = [[(r["step"], r["fid"]) for r in map(json.loads, (folder / "metrics.jsonl").open()) if "fid" in r]
              for folder in (out, straight)]
    assert scores[0] == scores[1] and [step for step, _ in scores[0]] == [2, 4]  # the uninterrupted run's


def test_an_evaluation_a_stop_interrupts_at_its_resume_too_is_given_up(run_cli, stand_in_inception, color_folder,
                                                                        tiny_unet, tmp_path, monkeypatch):
    """A job stopped during the owed evaluation at each resume went back to the same step for ever."""
    import os
    import signal

    from uncond import sampling

    sample_batches = sampling.sample_batches

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return sample_batches(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_batches", signalled)
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "6", "--eval_every_steps", "2",
                           "--eval_num_images", "4")
    for _ in range(2):  # stopped during it, then during its resume
        code, _, err = run_cli(*args)
        assert code == 143 and "the evaluation of step 2 is left out" in err and "at step 2," in err, err
    code, _, err = run_cli(*args)
    assert code == 143 and "the evaluation of step 2 is given up: a stop interrupted it at an earlier resume" in err
    assert "stopped by SIGTERM at step 3" in err, err  # it trained on, to the next grid (stopped in turn)


def test_an_owed_evaluation_a_resume_without_fid_could_not_make_is_made_by_the_next(run_cli, stand_in_inception,
                                                                                     color_folder, tiny_unet,
                                                                                     tmp_path, monkeypatch):
    """A resume without --eval_every_steps (or without torch-fidelity) does not make the owed evaluation; stopped
    before its next checkpoint, it recorded the evaluation as interrupted, and the next resume gave it up."""
    import os
    import signal

    from uncond import sampling, train

    sample_batches = sampling.sample_batches
    monkeypatch.setattr(sampling, "sample_batches", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM)
                        or sample_batches(*args, **kwargs))
    out = tmp_path / "run"
    without = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "6")
    evaluating = [*without, "--eval_every_steps", "2", "--eval_num_images", "4"]
    code, _, err = run_cli(*evaluating)
    assert code == 143 and "the evaluation of step 2 is left out" in err, err
    monkeypatch.setattr(sampling, "sample_batches", sample_batches)
    evaluate = train.evaluate_run
    monkeypatch.setattr(train, "evaluate_run", lambda run: os.kill(os.getpid(), signal.SIGTERM) or evaluate(run))
    code, _, err = run_cli(*without)  # stopped at once, before a step: no new checkpoint
    assert code == 143 and "stopped by SIGTERM at step 2" in err, err
    monkeypatch.setattr(train, "evaluate_run", evaluate)
    code, _, err = run_cli(*evaluating)
    assert code == 0 and "evaluation at step 2" in err and "given up" not in err, err


def test_training_evaluates_logs_and_keeps_the_best(run_cli, stand_in_inception, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4",
                                            "--eval_every_steps", "2", "--eval_num_images", "4", "--keep_best",
                                            "--logging_steps", "2"))
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "fid" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    assert all({"kid", "kid_std", "precision", "recall"} <= set(r) and r["eval_images"] == 4 for r in evaluations)
    assert (out / "fid_reference.npz").is_file() and (out / "best" / "model_index.json").is_file()
    best = json.loads((out / "best" / "scores.json").read_text())
    assert best["fid"] == min(r["fid"] for r in evaluations)
    assert err.count("evaluation at step") == 2
    assert "\x1b[A" not in err  # bars inside the training bar draw with cursor movements: not in a log file
    assert "computing FID reference statistics" in err
    args = fast_train_args(color_folder, tiny_unet, out, "--eval_every_steps", "2", "--eval_num_images", "4")
    code, _, err = run_cli(*args, "--max_train_steps", "6")  # resumed: the training images' statistics are kept
    assert code == 0 and "computing FID reference statistics" not in err, err
    (tmp_path / "other.pth").write_bytes(b"other weights")
    code, _, err = run_cli(*args, "--max_train_steps", "8", "--inception_weights", tmp_path / "other.pth")
    assert code == 0 and "computing FID reference statistics" in err, err  # not those of the other weights
    # --keep_best compared FIDs against the new reference with the best one against the old (trial 53 F2)
    (tmp_path / "third.pth").write_bytes(b"third weights")
    code, _, err = run_cli(*args, "--max_train_steps", "10", "--inception_weights", tmp_path / "third.pth",
                           "--keep_best")
    assert code == 0 and "the FID reference was measured anew (other images, or other feature weights): the FIDs " \
        "logged before were measured against the earlier one; --keep_best chooses among those measured from here" \
        in err, err
    assert json.loads((out / "best" / "scores.json").read_text())["step"] == 10


def test_a_gray_model_of_colour_images_is_measured_against_their_gray(run_cli, color_folder, tiny_unet, tmp_path,
                                                                      monkeypatch):
    """A 1-channel model trained on colour images learns their luma, but its FID reference kept their colour: a
    floor under its FID that no model could get below, and --keep_best chose by it (trial 52 F1)."""
    colourful = record_colour(monkeypatch)
    (tmp_path / "gray-unet").mkdir()
    gray_unet = tmp_path / "gray-unet" / "config.json"
    gray_unet.write_text(json.dumps({**TINY_UNET, "in_channels": 1, "out_channels": 1}))
    evaluating = ("--max_train_steps", "1", "--eval_every_steps", "1", "--eval_num_images", "4")
    code, _, err = run_cli(*fast_train_args(color_folder, gray_unet, tmp_path / "gray", *evaluating))
    assert code == 0 and "computing FID reference statistics of 12 training images, as gray as the model learns " \
        "them" in err, err
    assert colourful and not any(colourful)  # the reference and the samples alike
    colourful.clear()
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "colour", *evaluating))
    assert code == 0 and any(colourful), err  # a colour model's reference keeps the colour


def record_colour(monkeypatch) -> list[bool]:
    """The tiny stand-in feature network, recording per batch it measures whether any pixel's channels differ."""
    import uncond.metrics

    from conftest import make_tiny_extractor

    colourful: list[bool] = []

    def recording_extractor(weights, device):
        extractor = make_tiny_extractor(weights)
        network = extractor.network

        def recorded(pixels: torch.Tensor) -> torch.Tensor:
            colourful.append(bool((pixels[:, 0] != pixels[:, 1]).any() or (pixels[:, 1] != pixels[:, 2]).any()))
            return network(pixels)
        return dataclasses.replace(extractor, network=recorded)

    monkeypatch.setattr(uncond.metrics, "inception_extractor", recording_extractor)
    return colourful


def test_evaluate_measures_gray_samples_against_the_gray_of_colour_images(run_cli, color_folder, pipeline, tmp_path,
                                                                          monkeypatch):
    """A 1-channel model's samples (or a folder of them) against colour images: the colour put a floor under the
    FID that no model of gray images could get below. The reference is measured as gray, as training's is."""
    colourful = record_colour(monkeypatch)
    gray_model = save_tiny_pipeline(tmp_path / "gray", channels=1)
    sampling = ("--num_images", 4, "--steps", 2, "--batch_size", 4)
    assert run_cli("sample", gray_model, *sampling, "--output_dir", tmp_path / "samples")[0] == 0
    results = []
    for generated in (gray_model, tmp_path / "samples"):
        code, out, err = run_cli("evaluate", generated, *sampling, "--reference", color_folder, "--json")
        assert code == 0, err
        results.append(json.loads(out))
        assert "as gray (the generated images are gray)" in results[-1]["reference"]
    assert colourful and not any(colourful)  # the reference and the samples alike
    assert "read from the cache" in results[1]["reference"]  # one reference for the model and its samples
    assert results[0]["fid"] == pytest.approx(results[1]["fid"], rel=1e-6)

    colourful.clear()  # a colour model's reference keeps its colour, and gray statistics are not used for it
    code, out, err = run_cli("evaluate", pipeline, *sampling, "--reference", color_folder, "--json")
    assert code == 0 and any(colourful) and "as gray" not in json.loads(out)["reference"], err
    gray_statistics = results[0]["reference"].split("statistics cached in ")[1]
    code, _, err = run_cli("evaluate", pipeline, *sampling, "--reference", gray_statistics)
    one_line_error(code, err, f"--reference {gray_statistics}: its statistics were measured as gray")


def test_a_colour_folder_whose_first_image_is_black_is_measured_in_colour(run_cli, color_folder, gray_folder,
                                                                        tmp_path, monkeypatch):
    """The first image decided: a colour model's folder of samples whose 00000.png came out black (or a gray face
    among colour ones) had the reference measured as gray, a floor under its FID (trial 56 F1). Only a folder of
    gray images alone is measured so. Gray samples against statistics made in colour get a note (F5)."""
    colourful = record_colour(monkeypatch)
    samples = write_images(tmp_path / "samples", 12, seed=1, nested=False)
    Image.new("RGB", (20, 24)).save(samples / "a-black.png")  # the first, by name
    code, out, err = run_cli("evaluate", samples, "--reference", color_folder, "--batch_size", 13, "--json")
    assert code == 0, err
    colour_statistics = json.loads(out)["reference"].split("statistics cached in ")[1]
    assert "as gray" not in json.loads(out)["reference"] and all(colourful)  # both sides in colour

    code, out, err = run_cli("evaluate", gray_folder, "--reference", colour_statistics, "--json")
    assert code == 0, err
    assert "the generated images are gray and these statistics were not measured as gray: if they are of colour " \
        "images, pass the images as --reference" in json.loads(out)["reference"]
    code, out, err = run_cli("evaluate", gray_folder, "--reference", color_folder, "--json")
    assert code == 0 and "as gray (the generated images are gray)" in json.loads(out)["reference"], err


def test_training_without_inception_weights_warns_once_and_goes_on(run_cli, no_inception_weights, color_folder,
                                                                    tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4",
                                            "--eval_every_steps", "1", "--eval_num_images", "2"))
    assert code == 0, err
    assert err.count("no FID/KID in this run; training goes on") == 1 and "--inception_weights PATH" in err
    assert (out / "model_index.json").is_file()
    assert not any("fid" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    # a weights file given that cannot be used is bad input: an error, before the data (it warned, and trained on
    # without the evaluations asked for)
    (tmp_path / "damaged.pth").write_bytes(b"not weights")
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "other", "--max_train_steps", "4",
                                            "--eval_every_steps", "1", "--inception_weights", tmp_path / "damaged.pth"))
    errors = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(errors) == 1 and "training goes on" not in err and "data:" not in err, err
    assert not (tmp_path / "other").exists()


def test_keep_best_needs_evaluations(run_cli, color_folder, tiny_unet, tmp_path):
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--keep_best"))
    one_line_error(code, err, "--keep_best needs --eval_every_steps N")


def test_pickled_weights_load_as_tensors_only(run_cli, tmp_path):
    """A pipeline saved with safe_serialization=False (.bin weights) samples; one whose .bin holds anything but
    tensors is refused with the reason, and the code in it never runs."""
    from diffusers import DDPMPipeline

    plain = save_tiny_pipeline(tmp_path / "plain")
    pipeline = DDPMPipeline.from_pretrained(plain)
    pipeline.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not list((tmp_path / "bin" / "unet").glob("*.safetensors"))
    code, _, err = run_cli("sample", tmp_path / "bin", "--num_images", 1, "--steps", 1, "--output_dir", tmp_path / "a")
    assert code == 0 and "the UNet's weights are the pickled unet/diffusion_pytorch_model.bin, read as tensors" in err
    assert "An error occurred" not in err  # diffusers' note that it found no safetensors file, before loading it
    weights = tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": RunsCode(tmp_path / "marker")}, weights)
    code, _, err = run_cli("sample", tmp_path / "bin", "--num_images", 1, "--steps", 1, "--output_dir", tmp_path / "b")
    one_line_error(code, err, f"{tmp_path / 'bin'}: could not load the pipeline folder {tmp_path / 'bin'}: its UNet's "
                              "weights, unet/diffusion_pytorch_model.bin, are pickled and hold more than tensors, or "
                              "are damaged (uncond reads pickled weights as tensors only: no code in them runs)")
    assert not (tmp_path / "marker").exists()


def test_evaluate_says_it_samples_only_once_the_reference_is_measured(run_cli, stand_in_inception, pipeline,
                                                                     tmp_path):
    """"sampling N images" came before a reference of unreadable images was refused: nothing had been sampled."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for index in range(3):
        (broken / f"{index}.png").write_bytes(b"not a PNG")
    code, _, err = run_cli("evaluate", pipeline, "--reference", broken, "--num_images", 2, "--steps", 1)
    one_line_error(code, err, f"--reference {broken}: 0 readable images")
    assert "sampling 2 images" not in err
    code, _, err = run_cli("evaluate", pipeline, "--reference", write_images(tmp_path / "real", 3), "--num_images", 2,
                           "--steps", 1)
    assert code == 0 and "sampling 2 images" in err, err


def test_evaluate_with_an_unwritable_cache_gives_its_scores(run_cli, stand_in_inception, pipeline, tmp_path,
                                                             monkeypatch):
    """The reference statistics could not be cached: a traceback after they were computed, and no scores; then
    the report said they were "cached in" a file that does not exist (trial 64 F7)."""
    from uncond import cache, data

    monkeypatch.setattr(data, "cache_root", cache.cache_root)
    (tmp_path / "cache-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-file"))
    code, stdout, err = run_cli("evaluate", write_images(tmp_path / "generated", 4),
                                "--reference", write_images(tmp_path / "real", 4, seed=1), "--json")
    assert code == 0, err
    assert json.loads(stdout)["num_generated"] == 4 and json.loads(stdout)["fid"] > 0
    assert f"could not keep the statistics in {tmp_path / 'cache-file'}" in err and "Traceback" not in err
    assert json.loads(stdout)["reference"].endswith("; statistics not kept (the cache cannot be written)")
