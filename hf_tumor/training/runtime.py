"""Where the code runs: the CPU's instruction sets, the precision worth training in, and logging.

The same project runs on CPUs 3x apart for bf16 training and int8 inference (AVX2 only, or AVX512 with
native bf16 and VNNI), so runs and benchmarks record which kind of machine measured them.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger("hf_tumor")

CPU_FEATURES = ("avx2", "avx512", "vnni", "avx512_bf16", "amx_tile", "amx_fp16")


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` this CPU has, as PyTorch detects them."""
    return [name for name in CPU_FEATURES if getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accelerator_available() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def bf16_available() -> bool:
    """Whether bf16 autocast is worth using: CUDA GPUs with bf16, CPUs with native bf16 (AVX512-BF16, AMX).

    On an AVX2-only CPU bf16 is emulated and ResNetV2-50 trains 17x slower than in fp32, so it stays off.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if torch.backends.mps.is_available():
        return False
    return bool({"avx512_bf16", "amx_tile"} & set(cpu_features()))


def machine_kind() -> str:
    """A short name for the kind of machine, for benchmark file names: 'cuda', 'amx', 'avx512-bf16',
    'avx512', 'avx2' or the CPU architecture."""
    if torch.cuda.is_available():
        return "cuda"
    features = set(cpu_features())
    for kind, needs in (("amx", {"amx_tile"}), ("avx512-bf16", {"avx512_bf16", "vnni"}),
                        ("avx512", {"avx512"}), ("avx2", {"avx2"})):
        if needs <= features:
            return kind
    return platform.machine()


def hardware_description() -> str:
    """What this process runs on, in words, for the model card and benchmark files."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU: {os.cpu_count()} cores, {cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"


def setup_logging(verbose: bool = True) -> None:
    """INFO (or WARNING) lines with time and module; transformers' own INFO (whole configs at every save) off."""
    import transformers

    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    logger.setLevel(level)
    transformers.utils.logging.set_verbosity_warning()
