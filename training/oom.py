"""Out of memory: telling an allocation failure from other errors and saying it in one clause (the engine, the speed
harness and predict turn it into a one-line verdict instead of a traceback), and how much memory the host gives
(the CPU memory estimate). Imports torch only: cheap for the CLIs."""
from __future__ import annotations

import re
from pathlib import Path

import torch


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's ``torch.OutOfMemoryError``, the CPU allocator's "can't allocate memory"
    RuntimeError, or Python's MemoryError."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


def out_of_memory_summary(e: BaseException) -> str:
    """One short clause of an allocation failure: "CUDA out of memory, tried to allocate 2.00 GiB" (torch's CUDA
    message is a paragraph; the CPU allocator's names bytes)."""
    msg = str(e)
    kind = ("CUDA out of memory" if isinstance(e, torch.OutOfMemoryError) or "CUDA" in msg
            else "out of host memory")
    m = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]iB|\d+ bytes)", msg)
    if not m:
        return kind
    size = m.group(1)
    if size.endswith("bytes"):
        size = f"{int(size.split()[0]) / 2**30:,.2f} GiB"
    return f"{kind}, tried to allocate {size}"


def host_memory_bytes() -> int:
    """The memory this process's host may give it: physical RAM, or the container's cgroup limit when lower
    (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``; "max" and v1's huge no-limit value mean none)."""
    import psutil

    total = psutil.virtual_memory().total
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(f).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and 0 < int(limit) < total:
            return int(limit)
    return total
