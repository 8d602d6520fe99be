"""Resuming skips a checkpoint a kill cut off mid-save, and keeps it aside instead of deleting it."""
from __future__ import annotations

from custom_losses.train.checkpoints import COMPLETE_MARKER, complete_checkpoints, remove_all


def make_checkpoint(output_dir, step: int, complete: bool) -> None:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        (folder / COMPLETE_MARKER).write_text("{}")


def test_an_incomplete_last_checkpoint_is_set_aside_and_the_last_complete_one_is_resumed(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        make_checkpoint(tmp_path, step, complete)
    messages = []
    assert [p.name for p in complete_checkpoints(tmp_path, messages.append)] == ["checkpoint-5", "checkpoint-10"]
    assert (tmp_path / "checkpoint-15.incomplete" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert len(messages) == 1 and "checkpoint-15" in messages[0] and COMPLETE_MARKER in messages[0]
    # The same step cut off again later replaces the older leftover.
    make_checkpoint(tmp_path, 15, False)
    assert [p.name for p in complete_checkpoints(tmp_path, messages.append)] == ["checkpoint-5", "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15.incomplete", "checkpoint-5"]


def test_complete_checkpoints_sort_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        make_checkpoint(tmp_path, step, True)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]


def test_fresh_removes_complete_and_set_aside_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 5, True)
    make_checkpoint(tmp_path, 10, False)
    complete_checkpoints(tmp_path, lambda message: None)
    remove_all(tmp_path)
    assert list(tmp_path.iterdir()) == []
