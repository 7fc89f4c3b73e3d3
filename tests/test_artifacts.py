"""Atomic stage folders: all or nothing, and a damaged folder is never taken as complete."""

from __future__ import annotations

import pytest

from loraflow.store.artifacts import atomic_dir, is_complete, verify


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


def test_a_manifest_without_checksums_is_not_trusted(tmp_path):
    import json

    old = tmp_path / "old"
    old.mkdir()
    (old / "a.txt").write_text("hello")
    (old / "manifest.json").write_text(json.dumps({"files": ["a.txt"]}))  # the first manifest format
    assert "no checksums" in verify(old) and not is_complete(old)


def test_content_digest_is_remembered_until_the_file_changes(tmp_path):
    import os

    from loraflow.store.artifacts import content_digest, file_digest

    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    first = content_digest(f)
    assert first == file_digest(f)
    f.write_bytes(b"b" * 1000)  # an edit in place, same size: the new mtime is noticed
    assert content_digest(f) == file_digest(f) != first
    st = f.stat()
    f.write_bytes(b"c" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, inode and mtime: the remembered digest is used
    assert content_digest(f) != file_digest(f), "keys hash a file once per (path, size, mtime, inode)"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x").write_text("x")
    assert content_digest(tmp_path / "folder") != content_digest(tmp_path / "folder" / "x")


def test_a_cache_folder_is_hashed_once_per_process_until_its_files_change(tmp_path):
    """A run's processes check the converted model folder three times in seconds (pre-flight, tokenize, model: 0.5 s
    of hashing each for SmolLM2's 270 MB, seconds for a larger model): once per process, while every file keeps its
    size, mtime and inode, and the folder its inode."""
    import os
    import shutil

    from loraflow.store.artifacts import complete_in_process

    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"a" * 1000)
    weights = folder / "weights.bin"
    assert complete_in_process(folder)
    st = weights.stat()
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, inode and mtime: not read again
    assert complete_in_process(folder) and not is_complete(folder)
    weights.write_bytes(b"c" * 1000)  # an edit in place: the new mtime is seen, and the bytes read
    assert not complete_in_process(folder)
    shutil.rmtree(folder)
    with atomic_dir(folder) as tmp:  # replaced whole: another folder, checked again
        (tmp / "weights.bin").write_bytes(b"d" * 1000)
    assert complete_in_process(folder)
    (folder / "weights.bin").unlink()
    assert not complete_in_process(folder) and not complete_in_process(tmp_path / "absent")
