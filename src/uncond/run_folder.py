"""The output folder as successive runs share it: one run at a time (a lock), what a killed run left half
written, which checkpoint a run goes on from, later checkpoints set aside when a run is taken back, and the
earlier run that --overwrite_output_dir replaces, kept until the new one has saved."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from . import data, hub, tracking
from .checkpoint import (MANIFEST_FILE, PIPELINE_ITEMS, SAME_RUN_KEYS, STATE_FILE, checkpoint_problem,
                         complete_checkpoints, exported_step, remove)
from .config import (BEST_DIR, CHECKPOINT_NAME, PREVIEWS_DIR, REFERENCE_STATS_FILE, RUN_CONFIG_FILE, STAGING_PREFIX,
                     FolderInUse, TrainConfig, UsageError, counted, list_checkpoints, nearest_existing, same_place)

ABANDONED_PREFIX = "abandoned-after-step-"  # the later checkpoints a resume from an earlier one sets aside
INCOMPLETE_PREFIX = "incomplete-"  # a checkpoint found incomplete, set aside by the next run
REPLACED_DIR = ".replaced-run"  # --overwrite_output_dir: the earlier run, kept until the new one has saved
SETTING_ASIDE_DIR = ".replacing-run"  # REPLACED_DIR while being filled: renamed once it holds the whole run
# What a run writes into its output folder besides checkpoints, the pipeline and its --logging_dir:
# --overwrite_output_dir sets it aside.
RUN_ARTEFACTS = (PREVIEWS_DIR, tracking.METRICS_FILE, tracking.LOSS_PLOT_FILE, RUN_CONFIG_FILE, hub.CARD_FILE,
                 data.REPORT_FILE, BEST_DIR, REFERENCE_STATS_FILE)
PREVIEW_NAME = re.compile(r"^step-(\d+)\.png$")  # a run's sample grids, in PREVIEWS_DIR
# The names uncond stages its writes under (checkpoint.save_checkpoint, export and replace_path, metrics.save_stats),
# and no others: a user's own .tmp-build in a project folder used as --output_dir is not a leftover of uncond's.
REPLACED_ITEM = rf"(?:checkpoint-\d+|{'|'.join(re.escape(name) for name in PIPELINE_ITEMS)})"
STAGED_NAME = re.compile(rf"^{re.escape(STAGING_PREFIX)}(?:checkpoint-\d+|dropped-checkpoint-\d+|export|"
                         rf"{re.escape(REFERENCE_STATS_FILE)}|old-{REPLACED_ITEM})$")


def check_creatable(path: str, flag: str, file: bool = False, instead: str | None = None) -> None:
    """A folder a command makes (or writes in), or the folder of a `file` it writes, must be makeable: its nearest
    existing part a folder it may write in. Checked before any work, on every process, rather than failing on the
    one that makes it while the others wait (or after minutes of sampling). `instead`: what to do, if not to
    give `flag` another value."""
    instead = instead or f"choose another {flag}"
    named = Path(path).expanduser()
    if named.is_symlink() and not named.exists():  # a mkdir through it made its target's folders anywhere
        raise UsageError(f"{flag} {path}: a link to {os.readlink(named)}, which does not exist (or a loop of links); "
                         f"{instead}")
    existing = named.absolute()
    existing = nearest_existing(existing.parent if file else existing)
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; {instead}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable; {instead}")


def make_folder(folder: Path, flag: str) -> None:
    """Make `folder` (and its parents), or say in one line why it cannot be: what check_creatable cannot see (a root
    user in /proc, a full or read-only mount)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {folder}: cannot create it ({error.strerror})") from None


def preview_path(output_dir: Path, step: int) -> Path:
    return output_dir / PREVIEWS_DIR / f"step-{step:07d}.png"


def is_preview_folder(path: Path) -> bool:
    """A training run's PREVIEWS_DIR: its images are sample grids, not samples."""
    return path.resolve().name == PREVIEWS_DIR and (path.resolve().parent / RUN_CONFIG_FILE).is_file()


def preview_grids(output_dir: Path) -> list[tuple[int, Path]]:
    """The run's sample grids in step order; other files in PREVIEWS_DIR (the user's) are not the run's, nor
    is anything reached through a symlink (a PREVIEWS_DIR linked to a gallery elsewhere): what is returned may
    be moved or removed."""
    previews = output_dir / PREVIEWS_DIR
    if previews.is_symlink():
        return []
    found = [(int(match[1]), path) for path in previews.glob("step-*.png")
             if (match := PREVIEW_NAME.match(path.name)) and not path.is_symlink()]
    return sorted(found)


def clean_up_interrupted_writes(output_dir: Path) -> list[str]:
    """Before a run writes into `output_dir`: finish or undo what a killed run left half done.
    Returns one message per thing cleaned."""
    messages = []
    for old in staging_leftovers(output_dir, replaced=True):  # killed between replace_path's two renames
        current = output_dir / old.name.removeprefix(f"{STAGING_PREFIX}old-")
        if not current.exists():  # put the old one (an export's item, a checkpoint) back
            os.replace(old, current)
            messages.append(f"restored {current.name} from an interrupted write")
    for path in staging_leftovers(output_dir):
        remove(path)
        messages.append(f"removed {path.name}, left by an interrupted write")
    for _, path in list_checkpoints(output_dir):
        # Moved out of the way, not deleted: uncond writes checkpoints whole, so one that is not was damaged later
        # (a file deleted, a partial copy) or written in place by train_unconditional.py; its weights may be fine.
        problem = checkpoint_problem(path)
        if problem:
            aside = unused_name(output_dir / f"{INCOMPLETE_PREFIX}{path.name}")
            os.replace(path, aside)
            messages.append(f"set aside incomplete {path.name} as {aside.name} ({problem}); delete it when you no "
                            "longer need it")
    return messages


def staging_leftovers(output_dir: Path, replaced: bool = False) -> list[Path]:
    """What uncond's interrupted writes left in `output_dir`: staged copies, or (`replaced`) only the items
    replace_path had renamed away."""
    prefix = f"{STAGING_PREFIX}old-" if replaced else STAGING_PREFIX
    return sorted(path for path in output_dir.glob(f"{prefix}*") if STAGED_NAME.match(path.name))


def unused_name(path: Path) -> Path:
    """`path`, or with -2, -3... where it exists."""
    candidate, count = path, 1
    while candidate.exists():
        count += 1
        candidate = path.with_name(f"{path.name}-{count}")
    return candidate


def set_aside_later_checkpoints(output_dir: Path, step: int) -> tuple[str, Path | None]:
    """Resuming from step `step` of a folder holding checkpoints of later steps (a run taken back, e.g. after
    its loss diverged): those are the abandoned continuation's. Left in place they would pass for this run's:
    `latest` would resume them, and --checkpoints_total_limit, which keeps the highest steps, would remove each
    new checkpoint as soon as it is written. They are moved, whole, into a folder of their own, with the sample
    grids of those steps (beside the new run's, they would pass for its own). Returns a line to log (or '') and
    the folder they went into (or None)."""
    later = [path for later_step, path in list_checkpoints(output_dir) if later_step > step]
    if not later:
        return "", None
    aside = unused_name(output_dir / f"{ABANDONED_PREFIX}{step}")
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    grids = [path for grid_step, path in preview_grids(output_dir) if grid_step > step]
    if grids:
        (aside / PREVIEWS_DIR).mkdir()
        for path in grids:
            os.replace(path, aside / PREVIEWS_DIR / path.name)
    # Their logged metrics too: the resumed run drops them from metrics.jsonl (tracking.MetricsFile).
    records = [record for record in tracking.read_metrics(output_dir / tracking.METRICS_FILE)
               if record.get("step", 0) > step]
    if records:
        tracking.write_metrics(aside / tracking.METRICS_FILE, records)
    kept = [f"{counted(len(grids), 'sample grid')}"] * bool(grids) + ["metrics"] * bool(records)
    with_them = f" with their {' and '.join(kept)}" if kept else ""
    return (f"resuming from step {step}: {', '.join(path.name for path in later)}, of the run's later steps, moved "
            f"to {aside}{with_them} (delete it when you no longer need them)"), aside


# What resumes from a checkpoint did about the evaluation and sample grid it owes (a stop left them out): made,
# or interrupted by another stop. Read by the next resume from it (train.settle_owed); removed by the next save.
OWED_FILE = ".uncond-owed.json"


def owed_record(output_dir: Path, step: int) -> dict[str, set[str]]:
    """{"made": items, "interrupted": items} for the resumes from checkpoint-`step` since it was written, items
    being "evaluation" and "preview"."""
    try:
        record = json.loads((output_dir / OWED_FILE).read_text())
    except (OSError, ValueError):  # none; or cut short by a kill, which costs one more try at most
        record = {}
    if not isinstance(record, dict) or record.get("step") != step:
        return {"made": set(), "interrupted": set()}
    return {outcome: set(record.get(outcome, [])) for outcome in ("made", "interrupted")}


def record_owed(output_dir: Path, step: int, item: str, outcome: str) -> None:
    record = owed_record(output_dir, step)
    record[outcome].add(item)
    (output_dir / OWED_FILE).write_text(json.dumps({"step": step, **{outcome: sorted(items) for outcome, items
                                                                      in record.items()}}) + "\n")


def forget_owed(output_dir: Path) -> None:
    (output_dir / OWED_FILE).unlink(missing_ok=True)


LOCK_FILE = ".uncond-lock"
_held_locks: dict[Path, IO[str]] = {}


def lock_output_dir(output_dir: Path, wait_s: float = 0) -> None:
    """An exclusive lock on the folder until this run ends (the kernel drops it when the process does, however
    it ends; unlock_output_dir at the run's end): two runs writing one folder (a requeued job overlapping the old
    one, a notebook's run in a thread and the next cell's) interleave their checkpoints and metrics. Held by
    another run, it is waited for up to `wait_s`. No-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        return
    # (flock's lock is the open file's: a run in another thread of this process, on a file it opened, holds it too)
    handle = open(output_dir / LOCK_FILE, "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise FolderInUse(f"--output_dir {output_dir} is in use by another uncond run (process {holder}); "
                              "wait for it to end, or choose another --output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held_locks[output_dir.resolve()] = handle


def unlock_output_dir(output_dir: Path) -> None:
    handle = _held_locks.pop(output_dir.resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases its flock


def holds_trained_model(output_dir: Path) -> bool:
    """Whether `output_dir` holds a run's exported model, or what is left of one: with model_index.json removed (a
    copy in part) and no checkpoint, a run from step 0 replaced the weights and training history (trial 58 F4)."""
    return ((output_dir / "model_index.json").is_file() or (output_dir / STATE_FILE).is_file()
            or any((output_dir / "unet").glob("diffusion_pytorch_model.*")))


def find_resume_checkpoint(config: TrainConfig) -> tuple[Path | None, str]:
    """The checkpoint this run continues from (or None), and a line saying why.

    Without --resume_from_checkpoint, re-running a command on a folder with checkpoints continues the
    run; --overwrite_output_dir starts afresh instead. A named checkpoint that does not exist is an
    error: train_unconditional.py silently starts over.
    """
    output_dir = Path(config.output_dir)
    checkpoints = complete_checkpoints(output_dir)
    request = config.resume_from_checkpoint
    if request and request != "latest":
        path = Path(request)
        # A bare name is in --output_dir, as in train_unconditional.py (not in the current folder); a path is
        # taken as given, then its last part in --output_dir.
        candidates = [output_dir / path.name] if len(path.parts) == 1 else [path, output_dir / path.name]
        run_folder = next((p for p in (path, *candidates) if not CHECKPOINT_NAME.match(p.name)
                           and (p / RUN_CONFIG_FILE).is_file()), None)
        if run_folder is not None:  # a natural slip: the run's output folder for its checkpoint
            inside = ", ".join(p.name for _, p in complete_checkpoints(run_folder)) or "none yet"
            raise UsageError(f"--resume_from_checkpoint {request} is a run's output folder, not one of its "
                             f"checkpoints ({inside}); pass {run_folder / 'checkpoint-N'}")
        for candidate in candidates:
            if candidate.is_dir() and candidate.parent.name.startswith(ABANDONED_PREFIX) \
                    and candidate.parent.parent.resolve() == output_dir.resolve():
                # The folder's files (checkpoints, metrics.jsonl, sample grids) are of the branch it went on with.
                raise UsageError(f"--resume_from_checkpoint {request} is of a branch that {output_dir} left when "
                                 f"it went back to an earlier step; resuming it there would mix the two branches' "
                                 "checkpoints, metrics and grids: pass another --output_dir to go on with it")
            if (candidate / "model_index.json").is_file():  # (it was said to be an incomplete checkpoint)
                raise UsageError(f"--resume_from_checkpoint {candidate} is a pipeline folder (an export: the model, "
                                 "without the optimizer's state a resume needs), not a checkpoint; pass one of the "
                                 "run's checkpoint-N folders")
            if candidate.is_dir():
                problem = checkpoint_problem(candidate)
                if problem:
                    raise UsageError(f"--resume_from_checkpoint {candidate} is incomplete ({problem}); "
                                     "use `latest` for the newest complete one")
                return candidate, f"resuming from {candidate}"
        available = ", ".join(p.name for _, p in checkpoints) or "none"
        instead = ("use `latest` (or leave the flag out) to go on from the newest, or --overwrite_output_dir to "
                   "start afresh" if checkpoints else "leave it out to start a new run")
        raise UsageError(f"--resume_from_checkpoint {request}: no such checkpoint (in {output_dir}: {available}); "
                         f"{instead}")
    if checkpoints and (request == "latest" or not config.overwrite_output_dir):
        step, path = checkpoints[-1]
        why = "" if request else " (re-running on a folder with checkpoints continues the run; " \
                                 "--overwrite_output_dir starts afresh)"
        return path, f"resuming from {path.name} at step {step}{why}"
    if request == "latest":
        return None, f"--resume_from_checkpoint latest: no checkpoint in {output_dir} yet; starting a new run"
    return None, ""


def check_output_dir(config: TrainConfig, resuming: bool) -> str:
    """Refuse to overwrite a trained model. The one exception is the same run, killed before its first
    checkpoint: re-running its command starts it again. Returns a line to log, or ''."""
    output_dir = Path(config.output_dir)  # a folder, or none yet (check_creatable)
    readme = output_dir / hub.CARD_FILE
    if readme.is_file() and not hub.written_by_uncond(readme):
        raise UsageError(f"--output_dir {output_dir} holds a README.md that uncond did not write, which the model "
                         "card would replace; move it, or choose another --output_dir")
    if (output_dir / REPLACED_DIR).exists() and not config.overwrite_output_dir:
        raise UsageError(f"--output_dir {output_dir}: an --overwrite_output_dir run was killed before it saved, "
                         f"leaving the run it replaced in {output_dir / REPLACED_DIR}; pass --overwrite_output_dir "
                         "to replace that run, or move its files back into the folder to go on with it")
    found = others_outputs(output_dir, config)
    if found:  # with --overwrite_output_dir too: it replaces an earlier run, not the user's own files
        raise UsageError(f"--output_dir {output_dir} holds {', '.join(found)}, which no training run wrote and this "
                         "run would replace or add to; move them, or choose another --output_dir")
    if resuming or config.overwrite_output_dir:
        return ""
    incomplete = [f"{path.name}: {problem}" for _, path in list_checkpoints(output_dir)
                  if (problem := checkpoint_problem(path))]
    if incomplete:  # and none complete, or it would be resumed: the run is not started again from step 0
        raise UsageError(f"--output_dir {output_dir}: none of its checkpoints is complete ({'; '.join(incomplete)}); "
                         "restore their files to go on, or pass --overwrite_output_dir to start afresh")
    if not holds_trained_model(output_dir):
        return ""
    if interrupted_before_first_checkpoint(output_dir, config):
        return (f"the run that wrote {output_dir} was stopped before its first checkpoint; starting it again "
                "from step 0")
    raise UsageError(f"--output_dir {output_dir} already holds a trained model; pass --overwrite_output_dir to "
                     "replace it, or choose another --output_dir")


def others_outputs(output_dir: Path, config: TrainConfig) -> list[str]:
    """The names a run writes that `output_dir` already holds though no training run wrote the folder (no lock
    file of uncond's, no checkpoint or pipeline of uncond's or train_unconditional.py's): the user's own files
    (a project folder's samples/, logs/, loss.png), which a run would replace or mix with its own."""
    if not output_dir.is_dir() or (output_dir / LOCK_FILE).exists() or training_checkpoints(output_dir) \
            or holds_trained_model(output_dir):
        return []
    names = [name for name in (*RUN_ARTEFACTS, *PIPELINE_ITEMS, config.logging_dir) if name != hub.CARD_FILE]
    return [path.name + "/" * path.is_dir() for path in existing_inside(output_dir, names)]


def training_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint-N folders a training run wrote: uncond's (with their manifest, even if damaged since) and
    train_unconditional.py's. Another trainer's checkpoint-500 (transformers', say) does not make the folder a
    run whose logs/ and samples/ --overwrite_output_dir may replace."""
    return [path for _, path in list_checkpoints(output_dir)
            if (path / MANIFEST_FILE).is_file() or checkpoint_problem(path) is None]


def trackers_folder(output_dir: Path, logging_dir: str) -> Path:
    """Where the trackers write: --logging_dir in the output folder, as the seed script joins them. One outside it
    (absolute, or ../tb) is where several runs' logs go, for one `tensorboard --logdir`: each run gets a folder of
    its own there, named as its output folder (in one folder, their curves merged into one run)."""
    folder = output_dir / logging_dir
    if folder.resolve().is_relative_to(output_dir.resolve()):
        return folder
    return folder / output_dir.resolve().name


def existing_inside(output_dir: Path, names: Iterable[str]) -> list[Path]:
    """The paths of `names` that exist in `output_dir`. --logging_dir may be absolute or lead out of the folder
    (../tb): other runs' logs are not this folder's."""
    paths = [output_dir / name for name in names]
    return [path for path in paths if path.exists() and output_dir.resolve() in path.resolve().parents]


def interrupted_before_first_checkpoint(output_dir: Path, config: TrainConfig) -> bool:
    """The folder's export is an intermediate one of a run with the same settings (data, model, objective)."""
    state_file, config_file = output_dir / STATE_FILE, output_dir / RUN_CONFIG_FILE
    if not state_file.is_file() or not config_file.is_file() or json.loads(state_file.read_text()).get("finished"):
        return False
    saved, current = json.loads(config_file.read_text()), config.to_dict()
    # (settings added since a run was written are not in its file, and were then at their defaults' values)
    return all(same_place(saved[key], current[key]) for key in SAME_RUN_KEYS if key in saved)


def run_outputs(output_dir: Path, logging_dir: str) -> tuple[list[Path], list[Path]]:
    """What runs wrote into `output_dir`: checkpoints, pipeline, artefacts, logs and failed uploads; and apart,
    the sample grids (PREVIEWS_DIR may hold the user's own files too, which are left alone)."""
    items = [path for _, path in list_checkpoints(output_dir)]
    artefacts = [name for name in RUN_ARTEFACTS if name != PREVIEWS_DIR]
    items += existing_inside(output_dir, (*PIPELINE_ITEMS, *artefacts, logging_dir))
    items += hub.stale_snapshots(output_dir)  # failed uploads: retrying them would upload the old model
    return items, [path for _, path in preview_grids(output_dir)]


def set_aside_previous_run(output_dir: Path, logging_dir: str) -> list[str]:
    """--overwrite_output_dir without resuming: what an earlier run wrote is moved into REPLACED_DIR, so that its
    checkpoints are neither rotated with nor resumed instead of the new ones, and removed once the new run has
    saved a checkpoint or its pipeline (remove_replaced_run); a new run that fails before (on unreadable
    images, say) puts it back (restore_replaced_run). Returns the names set aside."""
    items, grids = run_outputs(output_dir, logging_dir)
    replaced, staging = output_dir / REPLACED_DIR, output_dir / SETTING_ASIDE_DIR
    earlier_attempt = replaced.exists()  # set aside by an --overwrite_output_dir run killed before it saved
    for path in items + grids:
        if earlier_attempt:  # what the folder holds besides is that attempt's: no model
            remove(path)
        else:  # into a folder renamed REPLACED_DIR once whole: a run killed half-way is put back whole
            target = staging / path.relative_to(output_dir)  # (put_back_interrupted_set_aside)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    if staging.exists():
        staging.rename(replaced)
    if grids:
        remove_if_empty(output_dir / PREVIEWS_DIR)
    return [path.relative_to(output_dir).as_posix() for path in items] + \
        [f"{counted(len(grids), 'sample grid')} from {PREVIEWS_DIR}/"] * bool(grids)


@dataclass
class FolderStart:
    """What a run changed in its output folder before training (train.prepare_output_dir), to be undone if it
    fails before it saves (undo_unsaved_start)."""
    created: Path | None  # the highest folder the run made: the output folder or one above it (None: it existed)
    replacing: bool  # --overwrite_output_dir set an earlier run aside
    was_empty: bool = False  # the output folder existed with nothing in it
    resume_step: int | None = None
    abandoned: Path | None = None  # where going back set the later checkpoints aside
    settings: str | None = None  # the training_config.json the folder held
    export_step: int | None = None  # the step of the folder's exported pipeline, where whole (exported_step)

    def put_back_settings(self, output_dir: Path) -> None:
        """The training_config.json the folder held, in place of this run's."""
        if self.settings is not None:
            (output_dir / RUN_CONFIG_FILE).write_text(self.settings)


def undo_unsaved_start(output_dir: Path, logging_dir: str, start: FolderStart) -> str:
    """A run that failed before it saved a checkpoint or its pipeline leaves `output_dir` as it found it: what
    it wrote into a folder it made or found empty is removed (an empty TensorBoard run, a training_config.json of
    no model; the folders it made too, the ones above included, if nothing else is in them) unless it logged
    losses (a loss that diverged is worth seeing); an earlier run set aside by --overwrite_output_dir is put
    back, and so are the later checkpoints going back set aside, and the folder's training_config.json.
    Returns a line to log, or ''."""
    newest = max((step for step, _ in list_checkpoints(output_dir)), default=None)
    exported = exported_step(output_dir)
    if (newest is not None and newest > (start.resume_step or -1)) or exported != start.export_step:
        return ""  # it saved: the folder is this run's now
    if start.created or start.was_empty:
        if not (output_dir / tracking.METRICS_FILE).exists():
            items, grids = run_outputs(output_dir, logging_dir)
            for path in [*items, *grids, *existing_inside(output_dir, [LOCK_FILE])]:
                remove(path)
            remove_if_empty(output_dir / PREVIEWS_DIR)
            remove_made_folders(output_dir, start.created)  # said by nothing: the error is the news
        return ""
    if start.replacing:
        return restore_replaced_run(output_dir, logging_dir)
    start.put_back_settings(output_dir)
    return restore_abandoned(output_dir, start.abandoned, start.resume_step) if start.abandoned else ""


def restore_abandoned(output_dir: Path, aside: Path, step: int) -> str:
    """The later checkpoints, grids and metrics that going back to `step` set aside, put back."""
    names = []
    for path in sorted(aside.iterdir()):
        if path.name == PREVIEWS_DIR:
            move_back(path, output_dir / PREVIEWS_DIR)
        elif CHECKPOINT_NAME.match(path.name):
            os.replace(path, output_dir / path.name)
            names.append(path.name)
    metrics = output_dir / tracking.METRICS_FILE
    records = [record for record in tracking.read_metrics(metrics) if record.get("step", 0) <= step]
    records += tracking.read_metrics(aside / tracking.METRICS_FILE)
    if records:
        tracking.write_metrics(metrics, records)
    remove(aside)
    return f"this run ended before saving anything: {', '.join(names)} put back from {aside}"


def restore_replaced_run(output_dir: Path, logging_dir: str) -> str:
    """The earlier run that --overwrite_output_dir set aside, put back: this run failed before it saved, and
    what it wrote so far (its settings, logs, perhaps a grid; no model) goes. Returns a line to log, or ''."""
    replaced = output_dir / REPLACED_DIR
    if not replaced.is_dir():
        return ""
    items, grids = run_outputs(output_dir, logging_dir)
    for path in items + grids:
        remove(path)
    move_back(replaced, output_dir)
    remove_if_empty(output_dir / PREVIEWS_DIR)
    return (f"--overwrite_output_dir: this run ended before saving anything, so the earlier run it set aside is "
            f"back in {output_dir}")


def move_back(aside: Path, folder: Path) -> None:
    """What `aside` holds, moved back into `folder`, and `aside` removed. Into its folders that exist there, not
    over them: sample grids set aside go back beside the user's files in PREVIEWS_DIR, a --logging_dir of two
    parts (logs/tb) beside what else logs/ holds."""
    folder.mkdir(exist_ok=True)
    for path in aside.iterdir():
        if path.is_dir() and not path.is_symlink() and (folder / path.name).is_dir():
            move_back(path, folder / path.name)
        else:
            os.replace(path, folder / path.name)
    aside.rmdir()


def put_back_interrupted_set_aside(output_dir: Path) -> str:
    """An --overwrite_output_dir run killed while it moved the earlier run into SETTING_ASIDE_DIR (SIGKILL in those
    milliseconds) left that run part there, part in place, where the next run would take the rest for the killed
    run's and remove it. Put back whole before a run is planned on the folder: under the folder's lock, which a
    run setting aside holds, and which the processes of one launch, all planning at once, take in turn.
    Returns a line to log, or ''."""
    staging = output_dir / SETTING_ASIDE_DIR
    if not staging.is_dir():
        return ""
    lock_output_dir(output_dir, wait_s=10)
    try:
        if not staging.is_dir():  # another process of this launch put it back while this one waited
            return ""
        move_back(staging, output_dir)
    finally:
        unlock_output_dir(output_dir)
    return (f"--overwrite_output_dir: a run stopped while it set the earlier run aside had moved part of it into "
            f"{staging}; put back into {output_dir}")


def highest_missing(folder: Path) -> Path | None:
    """The highest of `folder` and the folders above it that do not exist: what making `folder` makes."""
    missing = None
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing = path
    return missing


def remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()


def remove_made_folders(folder: Path, created: Path | None) -> None:
    """`folder` and those above it up to `created` (highest_missing's, before they were made), where empty."""
    for path in [folder, *folder.parents] if created is not None else []:
        remove_if_empty(path)
        if path == created:
            break


def remove_replaced_run(output_dir: Path) -> bool:
    """The run set aside by --overwrite_output_dir removed, now that this one has saved. Whether there was one."""
    replaced = output_dir / REPLACED_DIR
    if replaced.exists():
        remove(replaced)
        return True
    return False
