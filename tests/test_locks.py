"""psb_fast.locks: one process per folder, refused at once, recovered after kill -9."""

import os
import signal
import subprocess
import sys

import pytest

from psb_fast.locks import LOCK_FILE, FolderLocked, _same_file, exclusive

HOLD = """
import sys, time
from psb_fast.locks import exclusive
with exclusive(sys.argv[1], "test run"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_holder_in_the_same_process_is_refused_naming_the_folder(tmp_path):
    with exclusive(tmp_path / "run", "training run"):
        message = r"'.*run' is in use: another process holds its training run lock"
        with pytest.raises(FolderLocked, match=message):
            with exclusive(tmp_path / "run", "training run"):
                pass
    with exclusive(tmp_path / "run", "training run"):  # free again once released
        pass


def test_folders_it_created_are_removed_when_left_empty(tmp_path):
    with exclusive(tmp_path / "a" / "b", "run") as folder:
        assert (folder / LOCK_FILE).exists()
    assert not (tmp_path / "a").exists()
    with exclusive(tmp_path / "c", "run") as folder:
        (folder / "result.txt").write_text("kept")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["result.txt"]  # .lock removed


def test_a_lock_file_deleted_under_a_waiting_opener_is_not_trusted(tmp_path):
    path = tmp_path / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert _same_file(fd, path)
        path.unlink()  # what a releasing holder does
        assert not _same_file(fd, path)
        path.touch()
        assert not _same_file(fd, path)
    finally:
        os.close(fd)


@pytest.mark.slow
def test_another_process_holds_it_until_killed_with_sigkill(tmp_path):
    folder = tmp_path / "shards"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match="another process holds its sampling lock"):
            with exclusive(folder, "sampling"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        assert (folder / LOCK_FILE).exists()  # the dead holder's file is left behind ...
        with exclusive(folder, "sampling"):  # ... and its lock is gone with the process
            pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
