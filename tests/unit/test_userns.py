"""Id mapping decisions: subordinate ranges, the nested map's extents, refusing root."""

from __future__ import annotations

import pytest

from sandbox import userns
from sandbox.errors import SetupError


def test_read_subid_range_by_name_or_uid(tmp_path):
    f = tmp_path / "subuid"
    f.write_text("alice:100000:65536\nbad line\n999:300000:1000\nsbx:zero:5\n")
    assert userns.read_subid_range(str(f), "alice", 1) == userns.IdRange(100000, 65536)
    assert userns.read_subid_range(str(f), "sbx", 999) == userns.IdRange(300000, 1000)
    assert userns.read_subid_range(str(f), "nobody", 5) is None
    assert userns.read_subid_range(str(tmp_path / "missing"), "alice", 1) is None


def test_nested_map_has_one_extent_per_parent_extent():
    m = userns.IdMapping("subuid", 999, 995, userns.IdRange(200000, 65536),
                         userns.IdRange(200000, 1000))
    # the kernel refuses an extent spanning two parent extents, hence two lines
    assert m.nested_map() == "0 0 1\n1 1 1000\n"
    assert m.max_id == 1000
    single = userns.IdMapping("single", 999, 995, None, None)
    assert single.nested_map() == "0 0 1\n" and single.max_id == 0


def test_plan_mapping_modes(tmp_path, monkeypatch):
    sub = tmp_path / "subuid"
    sub.write_text("")
    monkeypatch.setattr(userns.os, "getuid", lambda: 4242)
    monkeypatch.setattr(userns.pwd, "getpwuid", lambda uid: type("P", (), {"pw_name": "u"}))
    auto = userns.plan_mapping("auto", subuid_file=str(sub), subgid_file=str(sub))
    assert auto.mode == "single" and auto.uid == 4242
    with pytest.raises(SetupError, match="subuid"):
        userns.plan_mapping("subuid", subuid_file=str(sub), subgid_file=str(sub))
    sub.write_text("u:500000:70000\n")
    assert userns.plan_mapping("auto", subuid_file=str(sub), subgid_file=str(sub)).mode == "subuid"


def test_root_is_refused(monkeypatch):
    monkeypatch.setattr(userns.os, "getuid", lambda: 0)
    with pytest.raises(SetupError, match="unprivileged"):
        userns.plan_mapping("auto")
