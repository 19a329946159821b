"""--push_to_hub and the model card. There is no Hub here: uploads go to a local stand-in for the Hub's
HTTP API (tests/hub_standin.py), which answers what huggingface_hub's create_repo and upload_folder ask."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import fast_train_args
from uncond import run_folder
from uncond.version import uncond_version
from hub_standin import HubStandIn
from test_train import one_line_error

TOKEN = "hf_standin_secret_token"
PIPELINE_FILES = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "scheduler/scheduler_config.json"}


@pytest.fixture
def standin(monkeypatch):
    """The stand-in, with huggingface_hub pointed at it (HF_ENDPOINT, read at import, patched) and online."""
    import huggingface_hub.constants

    with HubStandIn(token=TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


def hub_args(color_folder, tiny_unet, out, *extra):
    return fast_train_args(color_folder, tiny_unet, out, "--num_epochs", "2", "--save_model_epochs", "1",
                           "--save_images_epochs", "1", "--checkpointing_steps", "3", "--logger", "tensorboard",
                           "--push_to_hub", "--hub_model_id", "someone/tiny-ddpm", "--hub_token", TOKEN, *extra)


def token_anywhere(folder) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_push_to_hub_uploads_the_pipeline_card_and_pictures_in_the_background(run_cli, standin, color_folder,
                                                                              tiny_unet, tmp_path):
    out = tmp_path / "run"
    # The first upload (step 3) ends only after training has gone on to export step 6.
    standin.hold_first_commit_until = (out / ".hub-upload-step-6").exists
    code, stdout, err = run_cli(*hub_args(color_folder, tiny_unet, out))
    assert code == 0, err
    assert standin.created == ["someone/tiny-ddpm"] and not standin.unexpected
    assert [c.message for c in standin.commits] == ["uncond: step 3", "uncond: step 6"]
    assert err.index("exported the pipeline at step 6") < err.index("uploaded step 3")  # training did not wait

    uploaded = standin.commits[-1].files
    assert set(uploaded) == PIPELINE_FILES | {"README.md", "loss.png", "training_config.json",
                                              "samples/step-0000003.png", "samples/step-0000006.png"}
    assert all(uploaded[name] == (out / name).read_bytes() for name in uploaded  # the final export, whole...
               if name != "training_config.json")
    # ...and its settings, without the local paths that lead nowhere elsewhere (and may name one's own folders)
    settings = json.loads(uploaded["training_config.json"])
    local = json.loads((out / "training_config.json").read_text())
    assert local["train_data_dir"] == str(color_folder) and settings["train_data_dir"] == color_folder.name
    assert str(tmp_path) not in uploaded["training_config.json"].decode()
    assert {k: v for k, v in settings.items() if not str(local[k]).startswith(str(tmp_path))} == \
           {k: v for k, v in local.items() if not str(v).startswith(str(tmp_path))}
    assert (out / "checkpoint-6").is_dir() and (out / "logs").is_dir()  # written locally, never uploaded
    card = ModelCard(uploaded["README.md"].decode())
    assert 'DiffusionPipeline.from_pretrained("someone/tiny-ddpm")' in card.text
    assert "--hub_token '<token>'" in card.text or "--hub_token <token>" in card.text

    assert not any(TOKEN.encode() in data for commit in standin.commits for data in commit.files.values())
    assert TOKEN not in stdout + err and not token_anywhere(out)
    assert not list(out.glob(".hub-upload-*"))  # copies of finished uploads are removed


def test_wrong_token_fails_before_training_without_showing_it(run_cli, standin, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = [a if a != TOKEN else "hf_wrong_token" for a in hub_args(color_folder, tiny_unet, out)]
    code, stdout, err = run_cli(*args)
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and "cannot create the Hub repository someone/tiny-ddpm" in lines[0]
    assert "401" in lines[0] and "hf auth login" in lines[0]
    assert "hf_wrong_token" not in stdout + err
    assert not (out / "unet").exists() and not (out / "data_report.json").exists()


def test_private_repo_is_made_private_and_an_existing_public_one_refused(run_cli, standin, color_folder, tiny_unet,
                                                                          tmp_path):
    """create_repo leaves an existing repository as it is: --hub_private_repo must not upload into a public one."""
    private = ("--hub_private_repo", "--max_train_steps", "1")
    assert run_cli(*hub_args(color_folder, tiny_unet, tmp_path / "a", *private))[0] == 0
    assert standin.private == {"someone/tiny-ddpm": True} and len(standin.commits) == 1
    standin.private["someone/public-model"] = False
    code, _, err = run_cli(*hub_args(color_folder, tiny_unet, tmp_path / "b", *private, "--hub_model_id",
                                     "someone/public-model"))
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and "someone/public-model exists and is public" in lines[0], err
    assert len(standin.commits) == 1 and not (tmp_path / "b" / "data_report.json").exists()


def test_failed_upload_is_reported_and_its_files_kept_to_retry(run_cli, standin, color_folder, tiny_unet, tmp_path):
    standin.fail_commits = True
    out = tmp_path / "run"
    code, stdout, err = run_cli(*hub_args(color_folder, tiny_unet, out))
    assert code == 1, err
    assert "the upload of step 3 to the Hub (someone/tiny-ddpm) failed" in err  # reported as it failed
    last = [line for line in err.splitlines() if line.startswith("uncond: stopped:")]
    assert len(last) == 1 and "the upload of step 6" in last[0] and "403" in last[0]
    assert f"hf upload someone/tiny-ddpm {out / '.hub-upload-step-6'} ." in last[0]
    assert (out / "model_index.json").is_file()  # the trained model is saved all the same
    kept = out / ".hub-upload-step-6"
    assert sorted(p.name for p in out.glob(".hub-upload-*")) == [kept.name]
    assert {p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()} >= PIPELINE_FILES
    assert TOKEN not in stdout + err and not token_anywhere(out)
    # a later upload from the same folder supersedes the kept copy (the run goes on to a third epoch)
    standin.fail_commits = False
    code, _, err = run_cli(*hub_args(color_folder, tiny_unet, out, "--num_epochs", "3"))
    assert code == 0 and "uploaded step 9 to the Hub" in err, err
    assert not list(out.glob(".hub-upload-*"))
    # and --overwrite_output_dir sets a failed upload's copy aside with the rest of the earlier run
    kept.mkdir()
    assert kept.name in run_folder.set_aside_previous_run(out, "logs") and not kept.exists()


def test_model_card_describes_the_run(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4",
                                            "--logging_steps", "2", "--seed", "7"))
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.library_name == "diffusers"
    assert {"unconditional-image-generation", "diffusers"} <= set(card.data.tags)
    assert "![samples](samples/step-0000004.png)" in card.text and (out / "samples" / "step-0000004.png").is_file()
    final_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    for fact in ("16x16 px", "3 channels", "images from color", "for 4 optimizer steps (16 images seen)",
                 f"| {final_loss:.4f} |", "| resolution | 16 |", 'DiffusionPipeline.from_pretrained("',
                 "uncond train --train_data_dir"):
        assert fact in card.text, fact
    assert "--seed 7" in card.text and "Reproduce with:" in card.text
    assert "Every resolved setting, the seed included, is in `training_config.json`" in card.text
    # what bitwise equal weights also depend on
    assert f"Trained with uncond {uncond_version()}, torch {torch.__version__}, diffusers " in card.text
    assert f"; cpu, {torch.get_num_threads()} threads. The same weights, bit for bit, also need" in card.text
    # resumed with other settings: each command is in the card, with the steps it trained
    args = fast_train_args(color_folder, tiny_unet, out, "--seed", "7", "--checkpointing_steps", "2")
    assert run_cli(*args, "--max_train_steps", "2", "--overwrite_output_dir")[0] == 0
    assert run_cli(*args, "--max_train_steps", "6", "--learning_rate", "5e-5")[0] == 0
    assert run_cli(*args, "--max_train_steps", "6", "--learning_rate", "5e-5")[0] == 0  # complete: nothing to do
    text = ModelCard.load(out / "README.md").text
    assert "Trained in turns, each going on from the previous one's newest checkpoint" in text
    first, second = text.split("- steps 0 to 2 (with uncond ")[1].split("- steps 2 to 6 (with uncond ")
    assert "--max_train_steps 2 --overwrite_output_dir" in first and "--learning_rate" not in first
    assert "--max_train_steps 6 --learning_rate 5e-5" in second and "steps 6 to" not in second
    assert "Every resolved setting of the last turn" in second  # training_config.json is the last turn's


def test_model_card_usage_code_samples_as_uncond_does(run_cli, color_folder, tiny_unet, tmp_path):
    """The card's snippet, run as written (smaller batch): plain diffusers with uncond's preview sampler and
    its settings (trailing timesteps, DDPM's clipping), not the bare scheduler whose samples speckle."""
    import re

    import numpy as np
    import torch

    from uncond import sampling

    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2",
                                            "--sample_steps", "3"))
    assert code == 0, err
    snippet = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert "algorithm_type='sde-dpmsolver++'" in snippet and "thresholding=True" in snippet
    namespace: dict = {}
    torch.manual_seed(0)
    exec(snippet.replace("num_images = 16", "num_images = 2"), namespace)  # noqa: S102 - the card's own code
    assert len(namespace["images"]) == 2
    # the scheduler `uncond sample` makes from the exported training schedule
    from diffusers import DDPMScheduler

    expected = sampling.make_sampler("sde-dpmsolver++", DDPMScheduler.from_pretrained(out / "scheduler").config)
    assert dict(namespace["pipeline"].scheduler.config) == dict(expected.config)
    assert np.asarray(namespace["images"][0]).shape == (16, 16, 3)


def test_trackers_never_see_the_token_on_the_command_line(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    """W&B, Comet and others record sys.argv; the token is masked there before they start (and sys.argv is as it
    was after the command, for a caller in Python)."""
    from uncond import train

    args = [str(a) for a in fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "1",
                                            "--hub_tok", TOKEN)]  # an abbreviation argparse accepts
    monkeypatch.setattr("sys.argv", ["uncond", *args])
    init_trackers, seen = train.init_trackers, []
    monkeypatch.setattr(train, "init_trackers", lambda *a: seen.append(list(sys.argv)) or init_trackers(*a))
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert TOKEN not in " ".join(seen[0]) and "<token>" in seen[0]
    assert sys.argv == ["uncond", *args]
    assert not token_anywhere(tmp_path / "run")
    assert "--hub_tok '<token>'" in (tmp_path / "run" / "README.md").read_text()


def test_push_to_hub_without_a_network_says_so_instead_of_asking_to_log_in(run_cli, unreachable_hub, color_folder,
                                                                          tiny_unet, tmp_path, monkeypatch):
    import huggingface_hub.constants

    out = tmp_path / "run"
    code, stdout, err = run_cli(*hub_args(color_folder, tiny_unet, out))
    one_line_error(code, err, "--push_to_hub: cannot create the Hub repository someone/tiny-ddpm: cannot reach the "
                              "Hub (")
    assert "Connection refused" in err and "); check the network or drop --push_to_hub" in err
    assert "hf auth login" not in err and TOKEN not in stdout + err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, stdout, err = run_cli(*hub_args(color_folder, tiny_unet, out))
    one_line_error(code, err, "cannot reach the Hub (offline mode: HF_HUB_OFFLINE is set); unset HF_HUB_OFFLINE or "
                              "drop --push_to_hub")
    assert TOKEN not in stdout + err and not (out / "unet").exists() and not (out / "data_report.json").exists()
