"""What uncond moves, removes or uploads is only what it wrote: a user's files beside a run, another tool's
folder, and whatever a symlink in the output folder points to are left as they are (trial 40's findings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uncond import checkpoint, checkpoint_export, hub, run_folder
from uncond.config import TrainConfig, UsageError


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def earlier_run(output_dir: Path) -> Path:
    """A folder as an uncond run leaves it: settings, an export, a sample grid."""
    write(output_dir / "training_config.json", "{}")
    write(output_dir / "model_index.json", "{}")
    write(output_dir / "unet" / "config.json", "{}")
    return output_dir


def test_overwriting_a_run_whose_samples_folder_links_elsewhere_leaves_that_folder_alone(tmp_path):
    """It moved the gallery's step-*.png into the replaced run, crashed, and the next try deleted them."""
    gallery = tmp_path / "gallery"
    kept = [write(gallery / "step-0000200.png"), write(gallery / "holiday.png")]
    output_dir = earlier_run(tmp_path / "run")
    (output_dir / "samples").symlink_to(gallery)
    assert run_folder.preview_grids(output_dir) == []
    set_aside = run_folder.set_aside_previous_run(output_dir, "logs")
    assert "unet" in set_aside and not any("sample grid" in name for name in set_aside)
    assert run_folder.remove_replaced_run(output_dir)
    assert all(path.read_text() == "x" for path in kept) and (output_dir / "samples").is_symlink()


def test_another_trainers_checkpoint_does_not_let_a_run_replace_its_logs(tmp_path):
    """A transformers checkpoint-500 made the folder pass for a run's, and --overwrite_output_dir deleted logs/."""
    output_dir = tmp_path / "other"
    write(output_dir / "checkpoint-500" / "trainer_state.json", "{}")
    write(output_dir / "logs" / "events.out.tfevents.1")
    config = TrainConfig(dataset_name="x", output_dir=str(output_dir), overwrite_output_dir=True)
    with pytest.raises(UsageError, match="holds logs/, which no training run wrote"):
        run_folder.check_output_dir(config, resuming=False)


def test_only_leftovers_of_uncond_staged_writes_are_cleaned_up(tmp_path):
    """Every .tmp-* entry was deleted, a project folder's .tmp-build included."""
    output_dir = tmp_path / "project"
    users = write(output_dir / ".tmp-build" / "object.o")
    write(output_dir / ".tmp-old-notes.txt")
    write(output_dir / ".tmp-checkpoint-3" / "optimizer.bin")
    write(output_dir / ".tmp-export" / "model_index.json")
    messages = run_folder.clean_up_interrupted_writes(output_dir)
    assert messages == ["removed .tmp-checkpoint-3, left by an interrupted write",
                        "removed .tmp-export, left by an interrupted write"]
    assert users.exists() and (output_dir / ".tmp-old-notes.txt").exists()


def test_a_symlinked_unet_is_replaced_by_the_export_and_what_it_points_to_kept(tmp_path):
    """rmtree refused the link: the run crashed with a mixed export, and every re-run crashed the same way."""
    elsewhere = write(tmp_path / "other-disk" / "unet" / "config.json", "theirs")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "unet").symlink_to(elsewhere.parent)
    staged = write(tmp_path / "staging" / "unet" / "config.json", "new").parent
    checkpoint.replace_path(staged, output_dir / "unet")
    assert not (output_dir / "unet").is_symlink() and (output_dir / "unet" / "config.json").read_text() == "new"
    assert elsewhere.read_text() == "theirs" and not list(output_dir.glob(".tmp-*"))


def test_re_exporting_refuses_a_samples_folder_holding_the_users_files(tmp_path):
    """--overwrite_output_dir replaced samples/ whole, the user's picks with it."""
    output_dir = earlier_run(tmp_path / "export")
    write(output_dir / "samples" / "step-0000004.png")
    checkpoint_export.check_export_folder(output_dir, overwrite=True)  # the export's own grid: replaced
    write(output_dir / "samples" / "my-best-pick.png")
    with pytest.raises(UsageError, match="holds samples/my-best-pick.png, which no export wrote"):
        checkpoint_export.check_export_folder(output_dir, overwrite=True)


def test_push_to_hub_uploads_the_runs_sample_grids_and_nothing_else_from_samples(tmp_path):
    """Every *.png under samples/, subfolders and links included, went to a repository that is public by default."""
    output_dir = earlier_run(tmp_path / "run")
    write(output_dir / "samples" / "step-0000004.png")
    write(output_dir / "samples" / "my-holiday-photo.png")
    write(output_dir / "samples" / "private" / "step-0000001.png")
    (output_dir / "samples" / "step-0000008.png").symlink_to(write(tmp_path / "passport-scan.png"))
    snapshot = hub.BackgroundUploads("user/run", output_dir, token=None).snapshot(4)
    uploaded = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    assert uploaded == ["model_index.json", "samples/step-0000004.png", "training_config.json", "unet/config.json"]
    assert json.loads((snapshot / "training_config.json").read_text()) == {}
