"""psr keeps freed memory in glibc's heap (psr.allocator): a training step's large tensors are then reused
instead of page-faulted back in every step."""

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from psr.allocator import keep_freed_memory
    assert keep_freed_memory()
def step():  # a step's worth of large tensors (20 x 16 MB), freed at its end
    tensors = [torch.ones(4_000_000) for _ in range(20)]
    del tensors
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_step_memory_is_reused_without_page_faults():
    default, kept = faults_of_a_step("default"), faults_of_a_step("keep")
    print(f"\nminor page faults of the third step: default allocator {default}, psr's settings {kept}")
    assert default > 40_000  # 320 MB / 4 kB pages: all of it faulted in again
    assert kept < 0.1 * default  # measured 3.9k vs 74k
