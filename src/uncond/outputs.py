"""What a run writes for people: the exported pipeline (and the best one), the model card, the loss plot, and
the command lines that reproduce the run and go on from its newest checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

from . import checkpoint, data, environment, hub, metrics, run_folder, sampling, sources, streaming, tracking
from .config import BEST_DIR, TrainConfig, counted
from .parts import Run, drop_replaced_run, off_the_clock, training_state
from .plan import FSDP_CONFIG

logger = logging.getLogger("uncond")  # cli shows its records on the main process only


# loss.png is redrawn at a log line at most once a minute, and at most 2% of the time: a long run's metrics.jsonl
# (a million lines) takes seconds to read and draw.
LOSS_PLOT_EVERY_SECONDS, LOSS_PLOT_SHARE = 60, 0.02


def export_best(run: Run, unet: UNet2DModel, scores: metrics.Scores) -> None:
    """output_dir/best: the pipeline with the lowest FID so far, and its scores."""
    folder = run.output_dir / BEST_DIR
    checkpoint.export_pipeline(unet, run.noise_scheduler, folder, training_state(run))
    (folder / "scores.json").write_text(json.dumps({"step": run.step, **scores.as_dict()}, indent=2) + "\n")
    logger.info(f"best FID so far ({scores.fid:.3f}): exported to {folder}")


def export(run: Run, unet: UNet2DModel) -> None:
    """The pipeline folder with `unet` (averaged_unet's), the model card and the loss plot; upload if asked."""
    checkpoint.export_pipeline(unet, run.noise_scheduler, run.output_dir,
                               {**training_state(run), "finished": run.step >= run.max_train_steps})
    drop_replaced_run(run)
    records = draw_loss_plot(run)
    write_card(run, records)
    logger.info(f"exported the pipeline at step {run.step} to {run.output_dir}")
    if isinstance(run.batches, streaming.StreamedBatches):  # what the stream held is known only as it goes
        run.batches.write_report(run.output_dir / data.REPORT_FILE)
        logger.info(run.batches.summary())
    if run.uploads is not None:
        run.uploads.submit(run.step)


@off_the_clock
def draw_loss_plot(run: Run) -> list[dict[str, Any]]:
    """loss.png from metrics.jsonl, on the main process (the others have no metrics file); returns the records.
    Drawn at exports, at a stop, and as training goes (Run.loss_plot_due): exports can be hours apart."""
    started, records = time.perf_counter(), []
    if run.metrics_file:
        records = run.metrics_file.read()
        tracking.plot_metrics(records, run.output_dir / tracking.LOSS_PLOT_FILE)
    took = time.perf_counter() - started
    run.loss_plot_due = started + max(LOSS_PLOT_EVERY_SECONDS, took / LOSS_PLOT_SHARE)
    return records


def write_card(run: Run, records: list[dict[str, Any]]) -> None:
    write_card_of(run.output_dir, run.config, training_state(run), run.unwrapped_unet,
                  dict(run.noise_scheduler.config), records, run.repo_id)


def write_card_of(folder: Path, config: TrainConfig, state: dict[str, Any], unet: UNet2DModel,
                  scheduler_config: dict[str, Any], records: list[dict[str, Any]], repo_id: str | None = None,
                  exported_from: str | None = None, shown_as: Path | None = None) -> None:
    """The model card of the pipeline in `folder`, trained with `config` to the training `state` (parts.training_state:
    step, images seen, batch, commands); `records` are metrics.jsonl's up to that step. `exported_from`: the
    checkpoint that `uncond export` wrote out, where the run went on past it, into `folder` to be moved to
    `shown_as`, the folder the card names."""
    grids = run_folder.preview_grids(folder)
    shown_as = shown_as or folder
    last = records[-1] if records else {}
    step, processes = state["step"], state.get("num_processes", 1)
    facts = {"dataset": data_description(config), "resolution": config.resolution,
             "optimizer steps": step, "images seen": state.get("images_seen"),
             "global batch": f"{state.get('global_batch_size')} ({config.train_batch_size} per device x "
                             f"{counted(processes, 'process')} x {config.gradient_accumulation_steps} accumulation)",
             "learning rate": f"{config.learning_rate} ({config.lr_scheduler}, "
                              f"{config.lr_warmup_steps} warmup steps)",
             "prediction type": config.prediction_type, "EMA": config.use_ema,
             "mixed precision": state.get("precision", config.mixed_precision)}  # as trained
    if "loss" in last:  # null where --skip_nonfinite skipped every step of that interval
        facts["final loss (mean over the last logging interval)"] = (
            "none: every step was skipped (--skip_nonfinite)" if last["loss"] is None else f"{last['loss']:.4f}")
    # The card's usage code samples as the previews did, with the same scheduler settings.
    sample_steps = sampling.steps_for(config.sampler, config.sample_steps, config.ddpm_num_inference_steps)
    usage_code = sampling.diffusers_usage_code(config.sampler, scheduler_config, repo_id or str(shown_as), sample_steps)
    hub.write_model_card(folder, {
        "title": repo_id or shown_as.resolve().name,
        "dataset": data_description(config),
        "hub_dataset": hub_dataset_id(config),
        "pretrained": config.pretrained_model_name_or_path,
        "hub_base_model": hub_model_id(config.pretrained_model_name_or_path),
        "parameters": f"{sum(weight.numel() for weight in unet.parameters()) / 1e6:.2f}M",
        "resolution": config.resolution, "channels": unet.config.in_channels,
        "steps": step, "images_seen": state.get("images_seen"),
        "grid": grids[-1][1].relative_to(folder).as_posix() if grids else None,
        "metrics": facts, "reproduce": reproduce_section(state.get("commands") or [], step) + (
            f"\nThis model is the run's checkpoint at step {step}, written out with `uncond export "
            f"{shlex.quote(exported_from)} --output_dir {shlex.quote(str(shown_as))}`.\n" if exported_from else ""),
        "usage_code": usage_code,
    })


def data_description(config: TrainConfig) -> str:
    return config.dataset_name or f"images from {Path(os.path.abspath(config.train_data_dir)).name}"  # `.` too


def hub_dataset_id(config: TrainConfig) -> str | None:
    """The dataset's Hub id for the card's metadata; None for local data and the built-in digits."""
    name = config.dataset_name
    if not name or name.startswith(sources.BUILTIN_PREFIX) or Path(name).exists():
        return None
    return name


def hub_model_id(name: str | None) -> str | None:
    """A Hub model id for the card's base_model; None for a local folder or checkpoint."""
    return name if name and not Path(name).expanduser().exists() else None


@dataclass(frozen=True)
class Launch:
    """How the run's processes were started, for the commands that repeat it."""
    num_processes: int = 1
    sharded: bool = False
    num_machines: int = 1
    main_process: tuple[str, str] | None = None  # the main process's address and port, with several machines
    typed: tuple[str, ...] | None = None  # the launcher's command as it was typed, up to the script, where known

    @classmethod
    def of_this_run(cls, num_processes: int, sharded: bool) -> Launch:
        """As the launcher (torchrun, or accelerate launch through it) describes it in the environment, and
        its command as typed where it is this process's parent."""
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
        num_machines = max(1, num_processes // max(1, per_machine))
        address = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        return cls(num_processes, sharded, num_machines, address if num_machines > 1 and all(address) else None,
                   environment.typed_launch())

    def launcher(self) -> str:
        if self.typed is not None:  # the launch as typed: its config file, GPU ids, ports and precision kept
            words = [shlex.quote(word) for word in self.typed]
            if self.num_machines > 1:  # the same command on every machine, each with its rank in MACHINE_RANK
                words = [machine_rank_left_out(previous, word) for previous, word in zip(["", *words], words)]
                if words[:2] == ["accelerate", "launch"] and "$MACHINE_RANK" not in " ".join(words):
                    words.append("--machine_rank $MACHINE_RANK")  # the config file's rank is machine 0's, or 1's
            return " ".join([*words, "-m uncond"])
        if self.num_processes == 1 and not self.sharded:
            return "uncond"
        kind = f"--config_file {shlex.quote(str(FSDP_CONFIG))}" if self.sharded else "--multi_gpu"
        machines = ""
        if self.num_machines > 1:  # the same command on every machine, each with its rank in MACHINE_RANK
            address, port = self.main_process or ("MAIN_IP", "29500")
            machines = (f" --num_machines {self.num_machines} --machine_rank $MACHINE_RANK "
                        f"--main_process_ip {address} --main_process_port {port}")
        return f"accelerate launch {kind}{machines} --num_processes {self.num_processes} -m uncond"


RANK_OPTIONS = ("--machine_rank", "--node_rank", "--node-rank")  # accelerate launch's, torchrun's


def machine_rank_left_out(previous: str, word: str) -> str:
    """`word` of a launch command, with a machine's rank given as $MACHINE_RANK."""
    if previous in RANK_OPTIONS:
        return "$MACHINE_RANK"
    name, equals, _ = word.partition("=")
    return f"{name}=$MACHINE_RANK" if equals and name in RANK_OPTIONS else word


def reproduce_command(argv: list[str], launch: Launch, chosen_seed: int | None) -> str:
    """The command line of this run (`argv` with the token already masked by config.public_argv), with the
    launcher for several processes, and the seed when it was chosen at random."""
    words = list(argv)
    if chosen_seed is not None:
        words += ["--seed", str(chosen_seed)]
    return launch.launcher() + " " + " ".join(shlex.quote(word) for word in words)


def commands_so_far(state: dict[str, Any], step: int, command: str, software: str) -> list[dict[str, Any]]:
    """The commands that trained the model up to `step` (as the resumed checkpoint's state records them;
    those of abandoned later steps left out), and this run's, which goes on from `step`, with the `software`
    and device it runs on (environment.software_description)."""
    earlier = [entry for entry in state.get("commands", []) if entry["from_step"] < step]
    # the same command run again after a stop, on the same software: one turn (an earlier uncond's records none)
    if earlier and earlier[-1]["command"] == command and earlier[-1].get("software", software) == software:
        return earlier
    return earlier + [{"from_step": step, "command": command, "software": software}]


def reproduce_section(commands: list[dict[str, Any]], step: int) -> str:
    """The model card's way to train the model again: its command, or each of the commands that trained it
    in turn when it was resumed with other ones."""
    machines = ("Run it on every machine, with the machine's rank in `MACHINE_RANK`.\n\n"
                if any("$MACHINE_RANK" in entry["command"] for entry in commands) else "")
    if not commands:  # a checkpoint of an uncond from before the commands were recorded, exported
        return ("The commands that trained it are not recorded (it was trained by an earlier version of uncond). "
                "Every resolved setting, the seed included, is in `training_config.json`.\n")
    same_weights = ("The same weights, bit for bit, also need the same versions, device and CPU thread count "
                    "(floats summed in another order differ in their last bits).\n")
    if len(commands) == 1 and commands[0]["from_step"] == 0:
        trained_with = f"Trained with {software_of(commands[0])}. " if "software" in commands[0] else ""
        return (f"Reproduce with:\n\n```bash\n{commands[0]['command']}\n```\n\n{machines}"
                f"Every resolved setting, the seed included, is in `training_config.json`. {trained_with}"
                f"{same_weights}")
    lines = ["Trained in turns, each going on from the previous one's newest checkpoint (a turn may have been "
             "stopped before its command's end, at the step shown):\n"]
    if commands[0]["from_step"] > 0:  # resumed from a checkpoint that does not record its commands
        lines.append(f"- steps 0 to {commands[0]['from_step']}: by a command the checkpoint does not record\n")
    ends = [entry["from_step"] for entry in commands[1:]] + [step]
    for entry, end in zip(commands, ends):
        # A turn that trained no step ended the run where it was (a shorter --max_train_steps, say).
        steps = f"steps {entry['from_step']} to {end}" if end > entry["from_step"] else f"ended at step {end}"
        software = f" (with {software_of(entry)})" if "software" in entry else ""
        lines.append(f"- {steps}{software}:\n\n  ```bash\n  {entry['command']}\n  ```\n")
    lines.append(f"{machines}Every resolved setting of the last turn, the seed included, is in "
                 f"`training_config.json`. {same_weights}")
    return "\n".join(lines)


def software_of(turn: dict[str, Any]) -> str:
    """A turn's software and device, with the fewest CPU threads it trained on where it gave some up."""
    fewest = turn.get("fewest_threads")
    return turn["software"] + (f", down to {fewest} while other processes kept cores busy" if fewest else "")


def resuming_latest(argv: list[str], config: TrainConfig) -> list[str]:
    """`argv` set to go on from the newest checkpoint (--resume_from_checkpoint latest instead of a named one,
    given on the command line or in a config file)."""
    if not config.names_a_checkpoint() and not config.overwrite_output_dir:
        return list(argv)
    words, skip = [], False
    for word in argv:  # --overwrite_output_dir would remove the checkpoint to resume from
        if not skip and not word.startswith(("--resume_from_checkpoint", "--overwrite_output_dir")):
            words.append(word)
        skip = word == "--resume_from_checkpoint"
    return words + ["--resume_from_checkpoint", "latest"]


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Settings for the trackers' hyperparameter tables: scalars only, token dropped."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
