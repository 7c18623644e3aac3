"""udfs/malloc.py: fixed glibc thresholds keep large freed blocks for reuse."""

import subprocess
import sys

import pytest

from models.config import UserStageConfig
from tests.unit.test_user_window import Context
from udfs import user_window
from udfs.user_window import UserWindows

# Rounds of what a learner step does to the heap: twenty 2 MB blocks written and all
# freed. Prints the minor page faults of a round after two warm-up rounds.
ROUNDS = """
import ctypes, resource, sys
from udfs.malloc import keep_large_blocks
if sys.argv[1] == "tuned":
    assert keep_large_blocks()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def round_():
    blocks = [libc.malloc(2 << 20) for _ in range(20)]
    for b in blocks:
        ctypes.memset(b, 1, 2 << 20)
    for b in blocks:
        libc.free(b)
round_(); round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_large_blocks_are_reused_instead_of_faulted_in_again():
    # glibc's own thresholds give the freed top of the heap back to the OS: each round
    # faults its 40 MB in again (20 x 512 pages of 4 KB).
    assert _faults_per_round("default") > 5_000
    assert _faults_per_round("tuned") < 100


def test_stages_set_the_thresholds_when_they_open_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(user_window, "keep_large_blocks", lambda: calls.append(1) or True)
    UserWindows(UserStageConfig(), 5, "m").open(Context())
    assert calls == [1]
    UserWindows(UserStageConfig(), 5, "m", malloc_thresholds=False).open(Context())
    assert calls == [1]
