"""What this CPU offers the server: its name, core count, the instruction sets the kernels use, and so the
default `--dtype`.

`--dtype auto` is bfloat16 when the CPU multiplies bfloat16 natively (AVX-512 BF16's `vdpbf16ps`, or AMX tiles)
and this torch has oneDNN's packed bfloat16 linear; float32 otherwise, where oneDNN would emulate bf16 with
float32 arithmetic and gain little beyond halving the bytes.
"""

from __future__ import annotations

import os

import torch

# The flags a benchmark or a log line names: the ones the server's kernels care about.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entry of /proc/cpuinfo (empty off Linux)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def last_level_cache_bytes() -> int | None:
    """The largest cache the first CPU reports in sysfs (its last level, shared by the cores), or None off Linux
    or where sysfs does not say."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(root)
    except OSError:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for entry in entries:
        try:
            with open(f"{root}/{entry}/size", encoding="utf-8") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else None


def native_bf16() -> bool:
    """The CPU has bfloat16 dot products (AVX-512 BF16 or AMX), as torch sees it or /proc/cpuinfo says."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None and probe() for probe in probes):
        return True
    return bool(flags() & {"avx512_bf16", "amx_bf16"})


def vnni() -> bool:
    """The CPU has int8 dot products into int32 (AVX-512 VNNI or AVX-VNNI), as torch sees it or /proc/cpuinfo says."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    if probe is not None and probe():
        return True
    return bool(flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def default_dtype() -> str:
    from . import packed_linear

    return "bfloat16" if native_bf16() and packed_linear.available(torch.bfloat16) else "float32"


def describe() -> str:
    """One line for logs and benchmark output: model name, cores, the kernel-relevant flags present."""
    info = _cpuinfo()
    present = [f for f in KERNEL_FLAGS if f in set(info.get("flags", "").split())]
    return (f"{info.get('model name', 'unknown CPU')}, {cores()} cores, flags: {' '.join(present) or 'none named'}, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
