"""One owner per directory (flock, released by the kernel on any exit) and children that die with their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from transformer_comparison.errors import UserError
from transformer_comparison.run_lock import LOCK_FILE, DirectoryLock, lock_directory, lock_owner

HOLD = textwrap.dedent("""
    import sys, time
    from transformer_comparison.run_lock import DirectoryLock
    DirectoryLock(sys.argv[1], "run directory").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def holder(directory: Path) -> subprocess.Popen:
    """Another process that takes the lock and keeps it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_held_lock_is_refused_naming_the_directory_and_the_owner(tmp_path):
    process = holder(tmp_path)
    try:
        with pytest.raises(UserError) as error:
            DirectoryLock(tmp_path, "run directory").acquire()
        message = str(error.value)
        assert str(tmp_path) in message and f"pid {process.pid}" in message and "\n" not in message
        assert lock_owner(tmp_path) == process.pid
    finally:
        process.kill()
        process.wait()


def test_kill_9_of_the_owner_releases_the_lock(tmp_path):
    process = holder(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays, the lock does not
    assert lock_owner(tmp_path) is None
    with lock_directory(tmp_path, "run directory") as lock:
        assert lock.held and (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()  # a normal release removes it


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with lock_directory(tmp_path):
        with pytest.raises(UserError):
            DirectoryLock(tmp_path).acquire()


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(UserError) as error:
        DirectoryLock(tmp_path / "nope", "run directory").acquire()
    assert "does not exist" in str(error.value)


PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from transformer_comparison.run_lock import die_with_parent
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=die_with_parent)
    print(child.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_their_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and alive(child):
        time.sleep(0.05)
    assert not alive(child), "the child outlived its killed parent"


def alive(pid: int) -> bool:
    """Whether pid is a live process (a zombie, dead but not yet reaped by init, counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
