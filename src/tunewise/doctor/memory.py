"""Memory rule: the memory a run used at step 1 against the device's.

- memory_high (warning): the peak memory of step 1 (what the live monitor measures) is above
  MEMORY_HIGH (90%) of the device's memory.
"""

from __future__ import annotations

from tunewise.doctor.advice import memory_advice
from tunewise.doctor.findings import Finding

MEMORY_HIGH = 0.9


def check_memory(used: int, device_bytes: int) -> list[Finding]:
    """memory_high when `used` bytes at step 1 are above MEMORY_HIGH of `device_bytes`."""
    if not device_bytes or used <= MEMORY_HIGH * device_bytes:
        return []
    causes, fixes = memory_advice()
    title = f"memory at step 1 is {used / device_bytes:.0%} of the device"
    evidence = {"memory_bytes": used, "device_bytes": device_bytes}
    return [Finding(1, "warning", "memory_high", title, evidence, causes, fixes)]
