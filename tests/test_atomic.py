"""bench.atomic: the one atomic-write helper every writer uses."""
import os

import pytest

from bench.atomic import TMP_PREFIX, atomic_path, atomic_write_text, host_tag, temp_owner


def test_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    assert atomic_write_text(str(target), "one") == str(target) and target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            assert os.path.basename(tmp).startswith(f"{TMP_PREFIX}{host_tag()}-{os.getpid()}-") and tmp.endswith(".json")
            assert temp_owner(tmp) == (host_tag(), os.getpid())
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "one"                                  # the old file stands
    assert sorted(os.listdir(target.parent)) == ["meta.json"]            # and no temp file is left
    atomic_write_text(str(target), "two")
    assert target.read_text() == "two" and sorted(os.listdir(target.parent)) == ["meta.json"]


def test_directory_swap_replaces_or_keeps_whole_directories(tmp_path, monkeypatch):
    """swap_directory puts a finished temp directory in place (replacing the old one, or keeping it when told to);
    temp_directory removes what is left, and an exception leaves the target untouched and no temp behind."""
    from bench.atomic import swap_directory, temp_directory
    target = tmp_path / "models" / "m"

    def fill(tmp, text):
        open(os.path.join(tmp, "manifest.json"), "w").write(text)

    with temp_directory(str(target)) as tmp:
        assert os.path.basename(tmp).startswith(f"{TMP_PREFIX}{host_tag()}-{os.getpid()}-")
        assert os.path.dirname(tmp) == str(target.parent) and os.listdir(tmp) == []
        fill(tmp, "one")
        assert swap_directory(tmp, str(target)) is True
    assert (target / "manifest.json").read_text() == "one"
    with temp_directory(str(target)) as tmp:                  # replaced whole: the old directory's files go too
        fill(tmp, "two")
        open(os.path.join(tmp, "extra"), "w").write("x")
        assert swap_directory(tmp, str(target)) is True
    assert sorted(os.listdir(target)) == ["extra", "manifest.json"] and (target / "manifest.json").read_text() == "two"
    with temp_directory(str(target)) as tmp:                  # replace=False: the existing one stands
        fill(tmp, "three")
        assert swap_directory(tmp, str(target), replace=False) is False
    assert (target / "manifest.json").read_text() == "two"
    with pytest.raises(RuntimeError):
        with temp_directory(str(target)) as tmp:
            fill(tmp, "half")
            raise RuntimeError("killed mid-write")
    assert (target / "manifest.json").read_text() == "two"
    assert sorted(os.listdir(target.parent)) == ["m"]           # no temp or old directory is left
    # a parallel writer's directory appears after the check: the rename fails and theirs stands
    other = tmp_path / "models" / "n"
    other.mkdir()
    (other / "manifest.json").write_text("theirs")
    with temp_directory(str(other)) as tmp:
        fill(tmp, "mine")
        monkeypatch.setattr(os.path, "isdir", lambda p: False)
        assert swap_directory(tmp, str(other)) is False
        monkeypatch.undo()
    assert (other / "manifest.json").read_text() == "theirs" and sorted(os.listdir(target.parent)) == ["m", "n"]
