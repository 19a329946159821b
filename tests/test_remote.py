"""Loading a model, a dataset or a UNet config from a Hub that cannot be reached: one line that says so, without
the lines huggingface_hub logs for each failed request and retry, or diffusers' pointer to a stack trace."""

from __future__ import annotations

import pytest

from conftest import fast_train_args, write_images
from test_train import one_line_error

NOISE = ("thrown while requesting", "Retrying in", "stacktrace", "Traceback", "local_dir_use_symlinks")


def loads(folder, tiny_unet, tmp_path):
    """Each of the three loaders from the Hub, through the command that reaches it, with its error's start."""
    return {
        "pipeline": (["sample", "someone/some-model", "--output_dir", tmp_path / "out"],
                     "someone/some-model: could not load the Hub model someone/some-model (not in the local cache, "
                     "and the Hub cannot be reached: "),
        "dataset": (["evaluate", folder, "--reference", "someone/some-dataset"],
                    "--reference someone/some-dataset: could not load it (not in the local cache, and the Hub cannot "
                    "be reached: "),
        "pretrained": (fast_train_args(folder, "", tmp_path / "run", "--pretrained_model_name_or_path",
                                       "someone/some-model", "--dry_run"),
                       "--pretrained_model_name_or_path someone/some-model: could not load the Hub model "
                       "someone/some-model (not in the local cache, and the Hub cannot be reached: "),
        "unet config": (fast_train_args(folder, tiny_unet, tmp_path / "run", "--model_config_name_or_path",
                                        "someone/some-unet", "--dry_run"),
                        "--model_config_name_or_path someone/some-unet: could not load a UNet config from the Hub (not "
                        "in the local cache, and the Hub cannot be reached: "),
    }


@pytest.mark.parametrize("what", ["pipeline", "dataset", "unet config", "pretrained"])
def test_an_unreachable_hub_is_one_quiet_line(run_cli, unreachable_hub, stand_in_inception, tiny_unet, tmp_path,
                                              recwarn, what):
    args, expected = loads(write_images(tmp_path / "images", 2), tiny_unet, tmp_path)[what]
    code, _, err = run_cli(*args)
    assert not [line for line in err.splitlines() if any(noise in line for noise in NOISE)], err
    assert not [str(w.message) for w in recwarn if "huggingface_hub" in w.filename]
    one_line_error(code, err, expected)
    # the retries' wait (skipped here, half a minute without a network) is said once, as it starts (loading a
    # pipeline, diffusers asks once and gives up without retrying)
    said = err.count("the Hub does not answer; huggingface_hub retries for about half a minute")
    assert said == 1 or (what in ("pipeline", "pretrained") and said == 0), err


@pytest.mark.parametrize("what", ["pipeline", "dataset", "unet config", "pretrained"])
def test_offline_mode_is_named_as_the_reason(run_cli, stand_in_inception, tiny_unet, tmp_path, recwarn, what):
    args, expected = loads(write_images(tmp_path / "images", 2), tiny_unet, tmp_path)[what]
    code, _, err = run_cli(*args)  # HF_HUB_OFFLINE is set for every test
    assert not [str(w.message) for w in recwarn if "huggingface_hub" in w.filename]  # diffusers' deprecated call
    one_line_error(code, err, expected)
    assert "OfflineModeIsEnabled" in err or "offline mode: HF_HUB_OFFLINE is set" in err
    assert "stacktrace" not in err and "does not appear to have a file named config.json" not in err
