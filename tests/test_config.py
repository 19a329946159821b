"""Settings: the seed script's flags and defaults, config files, layering, validation."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import uncond
from uncond.config import (BETA_SCHEDULES, DEMO_SETTINGS, SETTINGS, TrainConfig, UsageError, add_train_arguments,
                           build_config)
from uncond.sampling import training_noise_scheduler

# Every flag of diffusers' examples/unconditional_image_generation/train_unconditional.py with its default,
# copied from its parse_args() (diffusers main, 2026-08).
SEED_DEFAULTS = {
    "dataset_name": None, "dataset_config_name": None, "model_config_name_or_path": None, "train_data_dir": None,
    "output_dir": "ddpm-model-64", "overwrite_output_dir": False, "cache_dir": None, "resolution": 64,
    "center_crop": False, "random_flip": False, "train_batch_size": 16, "eval_batch_size": 16,
    "dataloader_num_workers": 0, "num_epochs": 100, "save_images_epochs": 10, "save_model_epochs": 10,
    "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 500,
    "adam_beta1": 0.95, "adam_beta2": 0.999, "adam_weight_decay": 1e-6, "adam_epsilon": 1e-08, "use_ema": False,
    "ema_inv_gamma": 1.0, "ema_power": 3 / 4, "ema_max_decay": 0.9999, "push_to_hub": False, "hub_token": None,
    "hub_model_id": None, "hub_private_repo": False, "logger": "tensorboard", "logging_dir": "logs",
    "local_rank": -1, "mixed_precision": "no", "prediction_type": "epsilon", "ddpm_num_steps": 1000,
    "ddpm_num_inference_steps": 1000, "ddpm_beta_schedule": "linear", "checkpointing_steps": 500,
    "checkpoints_total_limit": None, "resume_from_checkpoint": None,
    "enable_xformers_memory_efficient_attention": False, "preserve_input_precision": False,
}
SEED_BOOLEAN_FLAGS = {name for name, default in SEED_DEFAULTS.items() if default is False}


def parse(*argv: str) -> tuple[TrainConfig, set[str]]:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return build_config(vars(parser.parse_args([str(a) for a in argv])))


def test_a_config_file_never_replaces_a_run_and_an_old_relative_record_is_refused(tmp_path, monkeypatch, caplog):
    """Earlier versions recorded --overwrite_output_dir in training_config.json (passed back, it replaced the run)
    and output_dir as typed (passed back from another folder, it started a new run there, unsaid)."""
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    record = run / "training_config.json"
    record.write_text(json.dumps({"train_data_dir": str(tmp_path), "output_dir": "run", "overwrite_output_dir": True}))
    monkeypatch.chdir(tmp_path)  # where the run was started: the record leads to it
    config, _ = parse("--config", record)
    assert config.overwrite_output_dir is False and "its overwrite_output_dir is ignored" in caplog.text
    caplog.clear()
    config, _ = parse("--config", record, "--overwrite_output_dir")  # asked for on the command line: nothing said
    assert config.overwrite_output_dir is True and "ignored" not in caplog.text
    monkeypatch.chdir(run)  # from inside the run: run/run, a run inside it, is not suggested
    with pytest.raises(UsageError, match=rf"leads from here to {run / 'run'}, not to the run that holds the file; "
                                         rf"pass --output_dir {run} to go on with that run$"):
        parse("--config", record)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match=rf"or --output_dir {tmp_path / 'elsewhere' / 'run'} to train there$"):
        parse("--config", record)
    assert parse("--config", record, "--output_dir", run)[0].output_dir == str(run)


def test_every_seed_flag_parses_to_the_seed_default():
    config, explicit = parse("--dataset_name", "x")
    assert explicit == {"dataset_name"}
    for name, default in SEED_DEFAULTS.items():
        if name != "dataset_name":
            assert getattr(config, name) == default, name
    assert {name for name, spec in SETTINGS.items() if spec.metadata["seed"]} == set(SEED_DEFAULTS)


def test_seed_command_line_parses_unchanged():
    # The seed's README command plus its test's flags, as users write them (also with `=`).
    config, _ = parse("--dataset_name=huggan/flowers-102-categories", "--output_dir=ddpm-ema-flowers-64",
                      "--mixed_precision=fp16", "--push_to_hub", "--resolution", "64", "--train_batch_size", "2",
                      "--num_epochs", "1", "--gradient_accumulation_steps", "1", "--ddpm_num_inference_steps", "2",
                      "--learning_rate", "1e-3", "--lr_warmup_steps", "5", "--checkpointing_steps=2",
                      "--checkpoints_total_limit=2", "--resume_from_checkpoint=checkpoint-6", "--use_ema",
                      "--center_crop", "--random_flip", "--local_rank", "0")
    assert config.dataset_name == "huggan/flowers-102-categories"
    assert config.mixed_precision == "fp16" and config.push_to_hub and config.use_ema
    assert config.learning_rate == 1e-3 and config.checkpoints_total_limit == 2
    assert config.resume_from_checkpoint == "checkpoint-6" and config.center_crop and config.random_flip


def test_the_seed_scripts_abbreviations_mean_what_they_mean_to_it(capsys):
    """train_unconditional.py takes any prefix unique among its own flags; the flags uncond adds made --eval,
    --model, --logging, --num, --ddpm_beta ambiguous, and --local matched two spellings of one flag (trial 63 F2)."""
    from uncond.cli import Parser

    parser = Parser(prog="uncond train")
    add_train_arguments(parser)
    values = vars(parser.parse_args(["--dataset_name", "x", "--eval", "4", "--model", "unet.json", "--logging", "tb",
                                     "--num", "2", "--ddpm_beta", "squaredcos_cap_v2", "--local", "3"]))
    assert {name: values[name] for name in ("eval_batch_size", "model_config_name_or_path", "logging_dir",
                                            "num_epochs", "ddpm_beta_schedule", "local_rank")} == {
        "eval_batch_size": 4, "model_config_name_or_path": "unet.json", "logging_dir": "tb", "num_epochs": 2,
        "ddpm_beta_schedule": "squaredcos_cap_v2", "local_rank": 3}
    for ambiguous in ("--sampl", "--hub"):  # among uncond's own flags, or among the seed's: as ambiguous as there
        with pytest.raises(SystemExit):
            parser.parse_args(["--dataset_name", "x", ambiguous, "3"])
        assert f"ambiguous option: {ambiguous} could match" in capsys.readouterr().err


@pytest.mark.parametrize("flag", sorted(SEED_BOOLEAN_FLAGS))
def test_seed_boolean_flags_take_no_value(flag):
    config, _ = parse("--dataset_name", "x", f"--{flag}")
    assert getattr(config, flag) is True


def test_config_file_yaml_and_json_with_flags_winning(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("dataset_name: builtin:mnist\nlearning_rate: 3e-4\ntrain-batch-size: 8\nuse_ema: true\n")
    config, explicit = parse("--config", yaml_file, "--train_batch_size", "32")
    assert config.learning_rate == 3e-4  # YAML reads 3e-4 as a string; it is coerced
    assert config.train_batch_size == 32 and config.use_ema is True
    assert {"learning_rate", "train_batch_size", "dataset_name"} <= explicit

    yaml_file.write_text("dataset_name: builtin:mnist\nmixed_precision: no\nmax_train_steps: null\n")
    config, _ = parse("--config", yaml_file)  # YAML reads `no` as false: it was refused as "False"
    assert config.mixed_precision == "no" and config.max_train_steps is None

    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"dataset_name": "builtin:mnist", "num_channels": 1}))
    config, _ = parse("--config", json_file)
    assert config.num_channels == "1"


@pytest.mark.parametrize("content, message", [
    ("dataset_name: x\nlearning_rat: 1e-3\n", "unknown setting 'learning_rat'; did you mean learning_rate?"),
    ("dataset_name: x\ntrain_batch_size: many\n", "bad.yaml: train_batch_size expects int, got 'many'"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("dataset_name: [unclosed\n", "could not be read"),
    # left empty, or null: tracebacks later (None % 8), for settings that must have a value
    ("dataset_name: x\nresolution:\n", "bad.yaml: resolution is given no value; give one, or leave it out for "
                                       "the default"),
    ("dataset_name: x\ntrain_batch_size: null\n", "train_batch_size is given no value"),
    # YAML 1.1 reads no and yes as booleans: true was taken as resolution 1
    ("dataset_name: x\nresolution: true\n", "resolution expects int, got True (YAML reads no, yes, off and on as "
                                            "false and true; quote the value)"),
    ("dataset_name: x\noutput_dir: no\n", "output_dir expects str, got False"),
])
def test_config_file_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UsageError) as error:
        parse("--config", path)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv, message", [
    ((), "no dataset given"),
    (("--dataset_name", "x", "--train_batch_size", "0"), "--train_batch_size is 0; it must be at least 1"),
    (("--dataset_name", "x", "--learning_rate", "-1"), "--learning_rate is -1.0; it must be positive"),
    (("--dataset_name", "x", "--ema_max_decay", "1.5"), "--ema_max_decay is 1.5; it must be in [0, 1)"),
    # 1 itself: Adam's bias correction divides by 1 - beta**t = 0 (NaN weights at the first step), an average of
    # decay 1 never moves from the random initial weights
    (("--dataset_name", "x", "--adam_beta1", "1"), "--adam_beta1 is 1.0; it must be in [0, 1)"),
    (("--dataset_name", "x", "--adam_beta2", "1"), "--adam_beta2 is 1.0; it must be in [0, 1)"),
    (("--dataset_name", "x", "--ema_max_decay", "1"), "--ema_max_decay is 1.0; it must be in [0, 1)"),
    (("--dataset_name", "x", "--snr_gamma", "0"), "--snr_gamma is 0.0; it must be positive"),
    (("--dataset_name", "x", "--ema_inv_gamma", "0"), "--ema_inv_gamma is 0.0; it must be positive"),
    (("--dataset_name", "x", "--ema_power", "-1"), "--ema_power is -1.0; it must be positive"),
    (("--dataset_name", "x", "--adam_epsilon=-1e-8"), "--adam_epsilon is -1e-08; it must be at least 0"),
    (("--dataset_name", "x", "--lr_scheduler", "piecewise_constant"),
     "--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. --lr_step_rules 1:1000,0.1:2000,0.01"),
    (("--dataset_name", "x", "--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:1000;0.1"),
     "--lr_step_rules 1:1000;0.1: not MULTIPLIER:STEP,...,MULTIPLIER"),
    (("--dataset_name", "x", "--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:1000,0.1:500,0.01"),
     "the steps must increase"),
    (("--dataset_name", "x", "--lr_step_rules", "1:1000,0.1"),
     "--lr_step_rules applies to --lr_scheduler piecewise_constant, not cosine"),
    # nan passes every comparison: it trained with a nan learning rate
    (("--dataset_name", "x", "--learning_rate", "nan"), "--learning_rate is nan; give a finite number"),
    (("--dataset_name", "x", "--max_grad_norm", "inf"), "--max_grad_norm is inf; give a finite number"),
    (("--dataset_name", "x", "--seed", "-1"), "--seed is -1; use a whole number from 0 to 4294967295"),
    (("--train_data_dir", ""), "--train_data_dir is empty (an unset shell variable?)"),  # it read the current folder
    # diffusers' polynomial decay ends at 1e-7: it raised after the images were decoded
    (("--dataset_name", "x", "--lr_scheduler", "polynomial", "--learning_rate", "1e-8"),
     "--lr_scheduler polynomial decays to 1e-07, so --learning_rate 1e-08 must be above that"),
    (("--dataset_name", "x", "--lr_num_cycles", "0"), "--lr_num_cycles is 0; it must be at least 1"),
    (("--dataset_name", "x", "--ddpm_beta_start", "0.03"), "--ddpm_beta_start 0.03 and --ddpm_beta_end 0.02: they "
                                                           "must rise from above 0 to below 1"),
])
def test_invalid_settings_are_refused(argv, message):
    with pytest.raises(UsageError) as error:
        parse(*argv)
    assert message in str(error.value)


def test_unknown_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--dataset_name", "x", "--lr_scheduler", "exponential")
    assert exit_info.value.code == 2
    assert "invalid choice: 'exponential'" in capsys.readouterr().err


def test_inception_weights_must_be_a_file(tmp_path):
    from uncond.config import check_weights_file

    with pytest.raises(UsageError, match=f"^--inception_weights {tmp_path} is a folder; pass the weights file in it"):
        check_weights_file(str(tmp_path))  # it said "no such file" of a folder that is there
    with pytest.raises(UsageError, match="no such file"):
        check_weights_file(str(tmp_path / "missing.pth"))


def test_a_config_file_syntax_error_says_where(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("resolution: 32\nmodel_preset: tiny\ntrain_data_dir: [imgs\nuse_ema: true\n")
    with pytest.raises(UsageError, match=r"could not be read: expected ',' or '\]', but got ':' at line 4, column 8$"):
        build_config({"config": str(config)})


@pytest.mark.parametrize("argv, message", [
    (("train", "--resolution", "abc"), "uncond: error: argument --resolution: expects int, got 'abc'"),
    (("sample", "model", "--num_images", "ten"), "uncond: error: argument --num_images: expects int, got 'ten'"),
    (("cache", "--remove_unused_days", "x"), "uncond: error: argument --remove_unused_days: expects int"),
    (("train", "--use-ema"), "uncond: error: unrecognized arguments: --use-ema (--use-ema: did you mean "
                             "--use_ema?) (see uncond train --help)"),  # it named no flag, and `uncond --help`
    (("sample", "model", "--num-images", "3"), "uncond: error: unrecognized arguments: --num-images 3 "
                                               "(--num-images: did you mean --num_images?)"),
    # the token is not shown: error messages end up in job logs
    (("train", "--hub-token", "hf_secret", "--hub-tok=abc"), "uncond: error: unrecognized arguments: --hub-token "
                                                              "<token> --hub-tok=<token> (--hub-token: did you mean "
                                                              "--hub_token?; --hub-tok: did you mean --hub_token?)"),
])
def test_a_mistyped_flag_or_number_is_one_line(capsys, argv, message):
    from uncond.cli import main

    code = main(list(argv))  # it was a 46-line traceback
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_ctrl_c_while_the_flags_are_read_is_one_line(capsys, monkeypatch):
    from uncond import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "add_train_arguments", interrupted)  # building the parser takes a third of a second
    code = cli.console(["train", "--dataset_name", "x"])  # it was a 20-line traceback
    assert code == 130 and capsys.readouterr().err == "uncond: interrupted\n"
    with pytest.raises(KeyboardInterrupt):  # from Python (a notebook): the caller's code stops too
        cli.main(["train", "--dataset_name", "x"])


def test_a_command_run_from_python_takes_its_words_as_python_has_them(capsys, monkeypatch):
    """A number in the list raised a TypeError from argparse, a string was read letter by letter (invalid choice:
    'p'), and no words read sys.argv: a Jupyter kernel's own (invalid choice: '/x/kernel-1.json')."""
    import uncond

    assert uncond.main(["train", "--demo", "--max_train_steps", 7, "--dry_run"]) == 0
    assert json.loads(capsys.readouterr().out)["max_train_steps"] == 7
    assert uncond.main("train --demo --max_train_steps 8 --dry_run") == 0
    assert json.loads(capsys.readouterr().out)["max_train_steps"] == 8
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/x/kernel-1.json"])
    assert uncond.main() == 0 and "usage: uncond" in capsys.readouterr().out
    # the `uncond` script an earlier install wrote calls main() for the command line
    monkeypatch.setattr(sys, "argv", ["/venv/bin/uncond", "launch-config", "fsdp"])
    assert uncond.main() == 0 and capsys.readouterr().out.strip().endswith("fsdp.yaml")


def test_demo_layer_sits_under_flags():
    config, _ = build_config({}, use_demo=True)
    assert config.dataset_name == DEMO_SETTINGS["dataset_name"] and config.demo
    config, _ = build_config({"demo": True, "max_train_steps": 7, "output_dir": "elsewhere"})
    assert config.max_train_steps == 7 and config.output_dir == "elsewhere"
    assert config.model_preset == DEMO_SETTINGS["model_preset"]


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_every_beta_schedule_builds(schedule):
    scheduler = training_noise_scheduler(TrainConfig(dataset_name="x", ddpm_beta_schedule=schedule).to_dict())
    assert scheduler.config.beta_schedule == schedule and len(scheduler.betas) == 1000


def test_hub_token_is_never_in_the_saved_config(tmp_path):
    config, _ = parse("--dataset_name", "x", "--hub_token", "hf_secret_value")
    config.save(tmp_path / "c.json")
    assert "hf_secret_value" not in (tmp_path / "c.json").read_text()
    assert config.hub_token == "hf_secret_value"


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_is_the_installed_packages(flag, capsys):
    from importlib.metadata import version

    from uncond.cli import main

    assert main([flag]) == 0
    said = capsys.readouterr().out
    # From a git checkout (the README's editable install) also its commit: every commit is version 0.1.0.
    package = Path(uncond.__file__).parent
    commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if commit and (package.parent.parent / "pyproject.toml").is_file():
        assert said.startswith(f"uncond {version('uncond')} (git {commit}") and said.endswith(")\n")
    else:
        assert said == f"uncond {version('uncond')}\n"


def test_the_rank_flag_as_torch_distributed_launch_spells_it():
    assert parse("--dataset_name", "x", "--local-rank=1")[0].local_rank == 1  # refused as unrecognized
    assert parse("--dataset_name", "x", "--local_rank", "0")[0].local_rank == 0


def test_the_demo_on_ones_own_images(tmp_path):
    """--demo --train_data_dir DIR: the demo's settings on DIR's images (it trained on the digits, saying that
    DIR was ignored for a --dataset_name the user never gave)."""
    config, _ = parse("--demo", "--train_data_dir", str(tmp_path))
    assert config.train_data_dir == str(tmp_path) and config.dataset_name is None
    assert config.model_preset == "tiny" and config.use_ema
    config, _ = parse("--demo", "--train_data_dir", str(tmp_path), "--dataset_name", "builtin:mnist")
    assert config.dataset_name == "builtin:mnist"  # both given: as without --demo


def test_a_command_run_from_python_leaves_the_callers_environment_as_it_was(tmp_path, monkeypatch):
    """torch sets TORCHINDUCTOR_CACHE_DIR as one of its modules loads during a first run, and it stayed in the
    caller's environment, for its subprocesses (trial 59 F3): what a command's libraries set is put back too."""
    import uncond
    from uncond import plan

    plan_run = plan.plan_run

    def setting_variables(*args, **kwargs):  # as a library does while it loads
        os.environ["A_LIBRARYS_SETTING"] = "set"
        os.environ["HOME"] = str(tmp_path)
        return plan_run(*args, **kwargs)

    monkeypatch.setattr("uncond.train.plan_run", setting_variables)
    home = os.environ["HOME"]
    assert uncond.main(["train", "--dataset_name", str(tmp_path / "missing"), "--dry_run"]) == 2
    assert "A_LIBRARYS_SETTING" not in os.environ and os.environ["HOME"] == home


def test_a_command_run_from_python_leaves_the_callers_logging_as_it_was(tmp_path, capsys, monkeypatch):
    """uncond.main, as a notebook calls it: the caller's own logging (a file handler on the root logger, its
    level) was replaced by uncond's, and a mistyped flag raised SystemExit (IPython's "An exception has
    occurred") where every other refusal returns a status. The libraries' logger levels and the environment
    variables a command sets (quieter libraries, no progress bars in a notebook) stayed set after it, as did
    sys.argv with a token masked."""
    import logging
    import sys

    import uncond

    for name in ("TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("diffusers", "datasets"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setattr(sys, "argv", ["kernel", "--hub_token", "hf_notebook"])
    assert uncond.main(["train", "--train_data_dir", str(tmp_path), "--hub_token", "hf_x", "--dry_run"]) == 2
    assert not {"TOKENIZERS_PARALLELISM", "HF_HUB_DISABLE_PROGRESS_BARS"} & set(os.environ)
    assert logging.getLogger("diffusers").level == logging.getLogger("datasets").level == logging.NOTSET
    assert sys.argv == ["kernel", "--hub_token", "hf_notebook"]

    root = logging.getLogger()
    notebook_log = logging.FileHandler(tmp_path / "notebook.log")
    root.addHandler(notebook_log)
    level = root.level
    try:
        assert uncond.main(["train", "--dataset_name", str(tmp_path / "missing"), "--dry_run"]) == 2
        assert uncond.main(["train", "--use-ema"]) == 2
        assert uncond.main(["sample", "--help"]) == 0
        assert notebook_log in root.handlers and root.level == level
        logging.getLogger("notebook").warning("the notebook's own")
        notebook_log.flush()
        assert (tmp_path / "notebook.log").read_text() == "the notebook's own\n"  # and none of uncond's
    finally:
        root.removeHandler(notebook_log)
        notebook_log.close()
    err = capsys.readouterr().err
    assert err.count("uncond: error:") == 3 and "uncond: error: unrecognized arguments: --use-ema" in err
    assert "no such folder" in err
