"""Where work runs: the ``--device`` choice, bf16 autocast on CPUs, and the CPU's name and flags.

Shared by featurize (extraction), models (fine-tuning, prediction) and the benchmarks (every
timing names the machine). torch is imported only by :func:`resolve_device`.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

from lesionlab.errors import LesionLabError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(device: str) -> "torch.device":
    """'auto' -> cuda when available, else cpu.

    Raises:
        LesionLabError: ``cuda`` asked for without a CUDA device, or a name not in ``DEVICES``.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LesionLabError("--device cuda asked for, but no CUDA device is available")
    if device not in DEVICES:
        raise LesionLabError(f"unknown --device {device!r}; expected one of {DEVICES}")
    return torch.device(device)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where unreadable)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def use_bf16(precision: str, device: "torch.device", flags: set[str] | None = None) -> bool:
    """Whether CPU work runs under bf16 autocast.

    ``auto`` picks bf16 only where the CPU computes it natively (avx512_bf16 or AMX): on a Xeon
    with avx512_vnni but no avx512_bf16, bf16 autocast halved lite0 training speed.
    ``flags`` defaults to :func:`cpu_flags`.
    """
    if device.type != "cpu" or precision == "fp32":
        return False
    if precision == "bf16":
        return True
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_model() -> str:
    """The CPU's model name (for every timing printed). Where the name has no number in it
    (virtual machines often report a bare "AMD EPYC" for CPUs 2.5x apart in speed), the
    x86 family and model from /proc/cpuinfo follow it: "AMD EPYC (family 25 model 17)"."""
    try:
        fields: dict[str, str] = {}
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model"):
                fields.setdefault(key.strip(), value.strip())
        name = fields.get("model name")
        if name:
            if not any(c.isdigit() for c in name) and "cpu family" in fields and "model" in fields:
                return f"{name} (family {fields['cpu family']} model {fields['model']})"
            return name
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
