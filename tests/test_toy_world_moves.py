"""A build's last step, moving the finished world into place, stopped by a kill at every rename
(os.replace failing stands in for SIGKILL: move_into_place has no cleanup that a kill would skip).
Whatever the stop, the next reader sees one whole world, the old or the new, never a folder without
its build.json rebuilt from defaults; the new world's settings survive a rebuild."""
import json
import os
import shutil

import pytest

from toyworld import folders, toy_build, world
from toyworld.folders import OLD, STAGING


@pytest.fixture(scope="module")
def shipped_copy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shipped") / "world")
    shutil.copytree(folders.WORLD, root, ignore=shutil.ignore_patterns(".lock", STAGING))
    return root


def staged_build(shipped_copy, tmp_path):
    """ROOT: the shipped world (the old one); ROOT/.building: a finished build of other settings
    (seed 7; its test split one problem shorter, so old and new files differ) with its build.json."""
    root = str(tmp_path / "world")
    shutil.copytree(shipped_copy, root)
    staging = os.path.join(root, STAGING)
    shutil.copytree(shipped_copy, staging, ignore=shutil.ignore_patterns("critics"))  # what a build writes
    with open(os.path.join(staging, "test.jsonl")) as f:
        lines = f.readlines()[:-1]
    with open(os.path.join(staging, "test.jsonl"), "w") as f:
        f.writelines(lines)
    with open(os.path.join(staging, "build.json")) as f:
        info = json.load(f)
    info["settings"]["seed"], info["n_test"] = 7, len(lines)
    with open(os.path.join(staging, "build.json"), "w") as f:
        json.dump(info, f)
    return root, info


def stop_at_rename(monkeypatch, n):
    """os.replace fails on its n-th call (1-based) from here on: the process "dies" there."""
    calls, real = [0], os.replace

    def replace(src, dst):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt("killed")  # not an OSError: nothing in the move may catch it
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return calls


RENAMES = 1 + 2 * len(folders.WORLD_ENTRIES) + 1  # old build.json aside; each entry aside and in; the new build.json


def test_renames_counts_every_rename_of_a_move(shipped_copy, tmp_path, monkeypatch):
    root, _ = staged_build(shipped_copy, tmp_path)
    calls = stop_at_rename(monkeypatch, 0)  # never fails: counts
    folders.move_into_place(os.path.join(root, STAGING), root)
    assert calls[0] == RENAMES


@pytest.mark.parametrize("n", range(1, RENAMES + 1))
def test_a_move_stopped_at_any_rename_reads_as_one_whole_world(n, shipped_copy, tmp_path, monkeypatch, capsys):
    root, new = staged_build(shipped_copy, tmp_path)
    stop_at_rename(monkeypatch, n)
    with pytest.raises(KeyboardInterrupt):
        folders.move_into_place(os.path.join(root, STAGING), root)
    monkeypatch.undo()
    monkeypatch.setattr(toy_build, "build", lambda *a, **k: pytest.fail("a build started"))
    moved_aside = n > 1  # from the second rename on, ROOT's build.json is in .building/.old
    assert folders.interrupted_move(root) == moved_aside
    out = toy_build.ensure_built(root, progress=False)  # what every reader of the world calls
    info = folders.check_world(root)  # whole: the files agree with the record
    assert info["settings"]["seed"] == (7 if moved_aside else 0)
    assert out["train"] == os.path.join(root, "train.jsonl")
    assert ("finished that move" in capsys.readouterr().err) == moved_aside
    if moved_aside:
        assert not os.path.exists(os.path.join(root, STAGING, "build.json"))
        assert info == new


def test_a_model_folder_after_a_stopped_move_is_still_a_world(shipped_copy, tmp_path, monkeypatch):
    """model=DIR/model names a world by the build.json beside it: the stopped move is finished
    before that is asked, so the run gets its world's budget, not 512 and another model kind."""
    root, new = staged_build(shipped_copy, tmp_path)
    stop_at_rename(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        folders.move_into_place(os.path.join(root, STAGING), root)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(root, "build.json"))
    assert world.is_world_model(os.path.join(root, "model"))
    assert folders.budget(root) == new["settings"]["max_new_tokens"]


def test_a_rebuild_after_a_stopped_move_keeps_the_new_worlds_settings(shipped_copy, tmp_path, monkeypatch):
    """`build --force` with no flags rebuilds with the settings build.json records: after a stopped
    move those are the staged world's (seed 7), which the move is finished to recover first."""
    root, _ = staged_build(shipped_copy, tmp_path)
    stop_at_rename(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        folders.move_into_place(os.path.join(root, STAGING), root)
    monkeypatch.undo()
    asked = []
    monkeypatch.setattr(toy_build, "build_in_place", lambda root, settings, *a, **k: asked.append(settings))
    toy_build.ensure_built(root, progress=False, force=True)
    assert [s.seed for s in asked] == [7]


def test_a_staged_world_without_its_record_is_never_moved(shipped_copy, tmp_path):
    """A staging folder without build.json is an unfinished build: the old world stays, untouched."""
    root, _ = staged_build(shipped_copy, tmp_path)
    os.remove(os.path.join(root, STAGING, "build.json"))
    os.makedirs(os.path.join(root, STAGING, OLD))
    assert not folders.interrupted_move(root)
    folders.recover(root)
    assert folders.check_world(root)["settings"]["seed"] == 0
