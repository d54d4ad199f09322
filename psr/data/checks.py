"""Input checks shared by the commands: the output folder can be written, the memory is there. Each
failure is one `InputError` line naming what and where."""

import os
import tempfile
from pathlib import Path

# Bytes of memory per particle and setting that a fit's forward + backward pass needs at the least
# (measured: 80 for 4D linear tracking to one screen, 340 for the 6D example with kick-drift elements).
FIT_BYTES_PER_PARTICLE_SETTING = 80
# Bytes per particle and setting of `psr simulate` (float64 tracking, no gradients).
SIMULATE_BYTES_PER_PARTICLE_SETTING = 6 * 8 * 2


class InputError(ValueError):
    """Bad input: reported as one line `psr <command>: error: <message>`, exit code 2."""


def check_output_folder(folder, what: str) -> None:
    """`folder` exists or can be made, and files can be written into it (tried with a probe that is removed;
    nothing is created on failure)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {folder}: cannot be made, {existing} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=".psr-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise InputError(f"{what} {folder}: cannot write there ({err.strerror or err})") from None


def available_memory() -> int | None:
    """Memory available to new allocations [bytes] (Linux MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(n_bytes: float, what: str, device: str = "cpu") -> None:
    """Refuse at once when `n_bytes` exceeds the memory available (on the GPU when device is cuda)."""
    available = available_memory()
    where = "memory"
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            available, where = torch.cuda.mem_get_info()[0], "GPU memory"
    if available is not None and n_bytes > available:
        raise InputError(f"{what} needs at least {n_bytes / 2**30:.1f} GiB, but only {available / 2**30:.1f} GiB "
                         f"of {where} is available: use fewer particles or settings")
