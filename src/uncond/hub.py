"""The Hugging Face Hub as where a model goes: model card, repository creation and upload, the only module that
writes to it (reading models, datasets and pipelines from it is models', sources', streaming's and sampling's,
through remote.py).
The token is passed through to huggingface_hub and never printed, logged or written."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from . import remote
from .config import PREVIEWS_DIR, RUN_CONFIG_FILE, RunFailed, TrainConfig, UsageError, counted, first_line

logger = logging.getLogger("uncond")

# Only the exported pipeline, its card, pictures and settings go up: never checkpoints, tracker logs,
# metrics or the data report (which names local files); the settings without the local paths.
# The run's sample grids only: a user's own pictures in samples/ (a subfolder's too) stay on their machine.
UPLOAD_PATTERNS = ["model_index.json", "unet/*", "scheduler/*", "README.md", f"{PREVIEWS_DIR}/step-*.png", "loss.png",
                   RUN_CONFIG_FILE]
SNAPSHOT_PREFIX = ".hub-upload-step-"
CARD_FILE = "README.md"  # where the Hub looks for a model card
CARD_TAG = "uncond"  # in the metadata of the cards uncond writes, which tells them from a user's README.md


def repository_id(config: TrainConfig) -> str:
    return config.hub_model_id or Path(config.output_dir).resolve().name


def create_repository(config: TrainConfig) -> str:
    """Create (or find) the model repository before training starts, so a missing login fails early.
    With --hub_private_repo an existing public repository is refused: create_repo leaves it as it is."""
    from huggingface_hub import HfApi

    api = HfApi(token=config.hub_token)
    try:
        repo_id = api.create_repo(repository_id(config), exist_ok=True, private=config.hub_private_repo).repo_id
        public = config.hub_private_repo and api.model_info(repo_id).private is False
    except Exception as error:  # noqa: BLE001 - offline, unauthenticated or forbidden: one line, no token
        raise UsageError(repository_failure(config, error)) from None
    if public:
        raise UsageError(f"--hub_private_repo: the Hub repository {repo_id} exists and is public; make it private "
                         "in its settings on the Hub, choose another --hub_model_id, or drop --hub_private_repo")
    return repo_id


def repository_failure(config: TrainConfig, error: Exception) -> str:
    """Why the repository could not be created, with what to do about it: no network is not a login problem."""
    import huggingface_hub.constants

    what = f"--push_to_hub: cannot create the Hub repository {repository_id(config)}"
    unreachable = remote.connection_failure(error)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if unreachable:
        fix = "unset HF_HUB_OFFLINE" if huggingface_hub.constants.HF_HUB_OFFLINE else "check the network"
        message = f"{what}: cannot reach the Hub ({unreachable}); {fix} or drop --push_to_hub"
    elif status in (401, 403):
        message = (f"{what} ({first_line(error)}); log in with `hf auth login` or pass --hub_token, or drop "
                   "--push_to_hub")
    else:
        message = f"{what} ({first_line(error)}); drop --push_to_hub to train without uploading"
    return message.replace(config.hub_token, "<token>") if config.hub_token else message


class BackgroundUploads:
    """Uploads of the exported pipeline at save points, one after another in huggingface_hub's
    background thread (`upload_folder(run_as_future=True)`), so training does not wait for the network.

    Each upload sends a copy of the files as they were at its save point, because training goes on
    rewriting them in the output folder meanwhile. A failed upload is logged as soon as it fails and a
    later save point uploads everything again; `wait` raises RunFailed if the last one failed, and
    keeps its copy so that it can be retried by hand.
    """

    def __init__(self, repo_id: str, output_dir: Path, token: str | None):
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # its live display would draw over the training progress bar
        self.api = HfApi(token=token)
        self.repo_id = repo_id
        self.output_dir = output_dir
        self.uploads: list[tuple[int, Path, Future]] = []

    def submit(self, step: int) -> None:
        self.discard_failed(keep_last=False)  # superseded by this newer upload
        snapshot = self.snapshot(step)
        self.uploads.append((step, snapshot, self.api.run_as_future(self.upload, step, snapshot)))
        logger.info(f"uploading step {step} to the Hub ({self.repo_id}) in the background")

    def snapshot(self, step: int) -> Path:
        """A copy of the files to upload, under a hidden folder of the output folder."""
        from huggingface_hub.utils import filter_repo_objects

        folder = self.output_dir / f"{SNAPSHOT_PREFIX}{step}"
        if folder.exists():
            shutil.rmtree(folder)
        # Not through a symlink: what it points to is not the run's (copy2 would copy the file it names).
        files = sorted(path.relative_to(self.output_dir).as_posix() for path in self.output_dir.rglob("*")
                       if path.is_file() and not path.is_symlink()
                       and not path.relative_to(self.output_dir).parts[0].startswith("."))
        for name in filter_repo_objects(files, allow_patterns=UPLOAD_PATTERNS):
            if name.startswith(f"{PREVIEWS_DIR}/") and name.count("/") > 1:  # fnmatch's * matches a / too
                continue
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            if name == RUN_CONFIG_FILE:
                (folder / name).write_text(shareable_settings((self.output_dir / name).read_text()))
            else:
                shutil.copy2(self.output_dir / name, folder / name)
        return folder

    def upload(self, step: int, snapshot: Path) -> None:
        """Runs in the upload thread; a failure is logged at once and kept in the future for `wait`."""
        try:
            commit = self.api.upload_folder(repo_id=self.repo_id, folder_path=str(snapshot),
                                            commit_message=f"uncond: step {step}")
        except Exception as error:
            logger.warning(f"the upload of step {step} to the Hub ({self.repo_id}) failed: {first_line(error)}; "
                           "the next save point uploads again")
            raise
        shutil.rmtree(snapshot, ignore_errors=True)
        for superseded in stale_snapshots(self.output_dir, before=step):  # an earlier run's failed uploads
            shutil.rmtree(superseded, ignore_errors=True)
        logger.info(f"uploaded step {step} to the Hub: {commit.commit_url}")

    def discard_failed(self, keep_last: bool) -> None:
        """Remove the copies of finished, failed uploads (but the newest one's if `keep_last`)."""
        kept = self.uploads[-1:] if keep_last else []
        for entry in self.uploads:
            step, snapshot, future = entry
            if entry not in kept and future.done() and future.exception() is not None:
                shutil.rmtree(snapshot, ignore_errors=True)

    def wait(self) -> None:
        """Wait for the uploads still running; raise RunFailed if the last one failed."""
        if not self.uploads:
            return
        step, snapshot, last = self.uploads[-1]
        if not last.done():
            logger.info(f"waiting for the upload of step {step} to the Hub to finish")
        error = last.exception()  # waits; uploads run one at a time, so every earlier one is done too
        self.discard_failed(keep_last=True)
        if error is not None:
            raise RunFailed(f"the upload of step {step} to the Hub ({self.repo_id}) failed ({first_line(error)}); "
                              f"the model is saved; retry with: hf upload {self.repo_id} "
                              f"{shlex.quote(str(snapshot))} .")


def shareable_settings(text: str) -> str:
    """training_config.json as uploaded: its absolute paths (the data's, the output folder's) cut to their last part,
    the folder's name: elsewhere they lead nowhere, and they may name a person's own folders."""
    settings = json.loads(text)
    for key, value in settings.items():
        if isinstance(value, str) and Path(value).is_absolute():
            settings[key] = Path(value).name
    return json.dumps(settings, indent=2) + "\n"


def stale_snapshots(output_dir: Path, before: float = float("inf")) -> list[Path]:
    """The copies kept of failed uploads (for their retry command) of steps before `before`."""
    steps = {path: path.name.removeprefix(SNAPSHOT_PREFIX) for path in output_dir.glob(f"{SNAPSHOT_PREFIX}*")}
    return sorted(path for path, step in steps.items() if step.isdigit() and int(step) < before)


def written_by_uncond(card: Path) -> bool:
    """Whether the README.md at `card` is a model card uncond wrote (its metadata carries the uncond tag)."""
    from huggingface_hub import metadata_load

    try:
        return CARD_TAG in ((metadata_load(card) or {}).get("tags") or [])
    except Exception:  # noqa: BLE001 - unreadable, or front matter that is not YAML: not ours
        return False


def table_cell(value: Any) -> str:
    """`value` in a Markdown table's cell: a `|` in it (a folder's name) split the row (trial 64 F10)."""
    return str(value).replace("|", "\\|")


def write_model_card(output_dir: Path, details: dict[str, Any]) -> Path:
    """output_dir/README.md, a Hub model card: what was trained on what, a sample grid, the final metrics,
    the command that reproduces the run, and how to use the model with diffusers."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(library_name="diffusers", license="apache-2.0",
                              pipeline_tag="unconditional-image-generation",
                              tags=["unconditional-image-generation", "diffusers", "diffusers:DDPMPipeline",
                                    CARD_TAG, "ddpm"],
                              datasets=[details["hub_dataset"]] if details.get("hub_dataset") else None,
                              base_model=details.get("hub_base_model"))
    start = f", starting from the weights of {details['pretrained']}," if details.get("pretrained") else ""
    grid = f"![samples]({details['grid']})\n\n" if details.get("grid") else ""
    metrics = "".join(f"| {name} | {table_cell(value)} |\n" for name, value in details.get("metrics", {}).items())
    content = f"""---
{card_data.to_yaml()}
---

# {details['title']}

An unconditional image diffusion model ({details['parameters']} parameters,
{details['resolution']}x{details['resolution']} px, {counted(details['channels'], 'channel')})
trained with uncond on {details['dataset']}{start}
for {counted(details['steps'], 'optimizer step')} ({counted(details['images_seen'], 'image')} seen).

{grid}## Use

```python
{details['usage_code']}```

## Training

| setting | value |
|---|---|
{metrics}
{details['reproduce']}"""
    path = output_dir / CARD_FILE
    # A path whose name is no UTF-8 (Latin-1 from an old zip) cannot be written as it is into a UTF-8 card: its
    # bytes show as U+FFFD (the card's write failed after training, and its empty README.md barred the resume;
    # trial 64 F2).
    ModelCard(content.encode(errors="surrogateescape").decode(errors="replace")).save(path)
    return path
