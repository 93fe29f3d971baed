"""Building a model makes glibc keep freed memory for reuse (moe_hooked/_malloc.py): the memory of
one full cache serves the next instead of being handed back to the kernel and faulted in afresh.

Checked in child processes (the setting is per process) by counting the minor page faults of a
repeated full `run_with_cache`, with the setting and with the `MOE_HOOKED_KEEP_FREED_MEMORY=0`
opt-out; the same runs, so the opt-out run is the reference.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from moe_hooked._malloc import OPT_OUT

CHILD = """
import resource, torch
from moe_hooked import HookedMoETransformer
from moe_hooked._malloc import keep_freed_memory
torch.set_num_threads(1)  # every allocation from the main thread's heap (worker threads have arenas of their own)
model = HookedMoETransformer.from_pretrained("moe-hooked/demo")
# 7 x 256 tokens: the logits (29 MiB) stay below glibc's largest mmap threshold, as every cached tensor does
tokens = torch.randint(4, model.cfg.d_vocab, (7, 256), generator=torch.Generator().manual_seed(0))
faults = []
with torch.inference_mode():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model.run_with_cache(tokens)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(keep_freed_memory(), sum(faults[1:]))
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc only"
)


def repeated_cache_faults(**env: str) -> tuple[bool, int]:
    """(whether the setting was applied, minor page faults of the 2nd to 5th full caches) in a fresh process."""
    child_env = {k: v for k, v in os.environ.items() if k not in (OPT_OUT, "GLIBC_TUNABLES")} | env
    out = subprocess.run([sys.executable, "-c", CHILD], env=child_env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_a_repeated_full_cache_reuses_freed_memory_instead_of_faulting_it_in_again():
    applied, kept = repeated_cache_faults()
    opted_out, returned = repeated_cache_faults(**{OPT_OUT: "0"})
    assert applied and not opted_out
    mib_returned = returned * 4096 / 2**20
    assert mib_returned > 32, f"the opt-out run should map fresh memory for most of its cache ({kept=}, {returned=})"
    assert kept < returned / 2, (kept, returned)
