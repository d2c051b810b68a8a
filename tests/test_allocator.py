"""engine/__init__.py's CPU allocator policy: THP_MEM_ALLOC_ENABLE=1 unless the user set it, and PyTorch really
acts on it (c10 then places allocations of 2 MiB and more at page boundaries and advises huge pages for them).
Fresh interpreters: c10 reads the variable
once, at its first allocation, so it cannot be observed in this pytest process (torch is imported already)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import engine, os, torch; ts = [torch.empty(n << 20, dtype=torch.uint8) for n in (2, 3, 6, 9)]; "
         "print(os.environ['THP_MEM_ALLOC_ENABLE'], sum(t.data_ptr() % 4096 == 0 for t in ts))")


def _probe(value):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = value
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])  # the setting, how many of the 4 blocks are page-aligned


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="THP allocation is Linux-only in PyTorch")
def test_engine_turns_on_huge_page_alignment_before_torch_loads():
    value, aligned = _probe(None)
    assert value == "1" and aligned == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="THP allocation is Linux-only in PyTorch")
def test_the_users_setting_wins():
    value, aligned = _probe("0")
    # c10's own 64-byte alignment: a block lands on a page boundary by chance only (1 in 64 each)
    assert value == "0" and aligned < 4
