"""Atomic stage folders: all or nothing, and a damaged folder is never taken as complete."""

from __future__ import annotations

import pytest

from loraflow.artifacts import atomic_dir, is_complete, verify


def test_complete_folder_verifies_and_damage_is_detected(tmp_path):
    final = tmp_path / "stage" / "key"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("hello")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00" * 100)
    assert is_complete(final) and verify(final) is None
    (final / "sub" / "b.bin").write_bytes(b"\x01" * 100)  # same size, other bytes
    assert verify(final) == "sub/b.bin does not match its checksum"
    (final / "a.txt").unlink()
    assert verify(final) == "a.txt is missing"
    assert "manifest.json" in verify(tmp_path / "nowhere")


def test_a_stage_that_fails_halfway_leaves_nothing(tmp_path):
    final = tmp_path / "stage" / "key"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("killed")
    assert not final.exists() and list((tmp_path / "stage").iterdir()) == []
