"""The Hugging Face Hub: model card, repository creation and upload. The only module that talks to it.
The token is passed through to huggingface_hub and never printed, logged or written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import TrainConfig, UsageError

# Only the exported pipeline, its card and pictures go up: never checkpoints, logs or run state.
UPLOAD_PATTERNS = ["model_index.json", "unet/*", "scheduler/*", "README.md", "samples/*.png", "loss.png",
                   "training_config.json", "metrics.jsonl"]


def repository_id(config: TrainConfig) -> str:
    return config.hub_model_id or Path(config.output_dir).resolve().name


def create_repository(config: TrainConfig) -> str:
    """Create (or find) the model repository before training starts, so a missing login fails early."""
    from huggingface_hub import create_repo

    try:
        return create_repo(repository_id(config), exist_ok=True, private=config.hub_private_repo,
                           token=config.hub_token).repo_id
    except Exception as error:  # noqa: BLE001 - offline, unauthenticated or forbidden: one line, no token
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--push_to_hub: cannot create the Hub repository {repository_id(config)} ({reason}); "
                         "log in with `hf auth login` or pass --hub_token, or drop --push_to_hub") from None


def upload(repo_id: str, output_dir: Path, token: str | None, message: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message=message, token=token,
                  allow_patterns=UPLOAD_PATTERNS)


def write_model_card(output_dir: Path, details: dict[str, Any]) -> Path:
    """output_dir/README.md: what was trained on what, a sample grid, and how to use it."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(library_name="diffusers", license="apache-2.0",
                              tags=["unconditional-image-generation", "diffusers", "uncond", "ddpm"],
                              datasets=[details["dataset"]] if "/" in details["dataset"] else None)
    grid = f"![samples]({details['grid']})\n\n" if details.get("grid") else ""
    metrics = "".join(f"| {name} | {value} |\n" for name, value in details.get("metrics", {}).items())
    content = f"""---
{card_data.to_yaml()}
---

# {details['title']}

An unconditional diffusion model ({details['parameters']} parameters, {details['resolution']}x{details['resolution']} px,
{details['channels']} channel{'s' if details['channels'] > 1 else ''}) trained with uncond on
{details['dataset']} for {details['steps']} optimizer steps ({details['images_seen']} images seen).

{grid}## Use

```python
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

pipeline = DiffusionPipeline.from_pretrained("{details['repo']}")
# 25 DPM-Solver++ steps instead of 1000 DDPM steps:
pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
images = pipeline(batch_size=16, num_inference_steps=25).images
```

or `uncond sample {details['repo']} --num_images 16`.

## Training

| setting | value |
|---|---|
{metrics}
Reproduce with:

```bash
{details['command']}
```
"""
    path = output_dir / "README.md"
    ModelCard(content).save(path)
    return path
