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
