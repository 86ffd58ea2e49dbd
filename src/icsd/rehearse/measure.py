"""How the rehearsal measures: peak memory of this process and its children, CPU time, time
inside named model calls, this machine's matmul rate, what the machine is."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .hooks import Probe


def rss_bytes(pid: int | None = None) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``); False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_self() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak resident memory of this process plus its children (DataLoader and executor workers)
    while the block runs: ``VmHWM`` (exact, this process) and a 20 Hz sample of the sum."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.sampled = 0
        self.baseline = 0
        self.peak = 0
        self.cuda_peak: int | None = None
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def total(self) -> int:
        import psutil

        me = psutil.Process()
        size = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                size += child.memory_info().rss
        return int(size)

    def sample(self) -> None:
        while not self.stop.wait(0.05):
            with contextlib.suppress(Exception):
                self.sampled = max(self.sampled, self.total())

    def __enter__(self) -> MemoryMeter:
        trim_heap()
        self.cpu_start = cpu_seconds()
        self.baseline = rss_bytes()
        self.exact = reset_peak_rss()
        self.cuda = cuda_available()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.cpu = cpu_seconds() - self.cpu_start
        hwm = peak_rss_self() if self.exact else None
        self.peak = max(self.sampled, hwm or 0)
        if self.cuda:
            import torch

            self.cuda_peak = int(torch.cuda.max_memory_allocated())


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


class Probes:
    """Time spent inside named model calls (UNet forward, VAE decode, generate, ...), by patching
    the classes' methods for the duration of the block: the stages' own code runs unchanged."""

    def __init__(self, targets: dict[str, tuple[type, str, Callable[..., int]]]) -> None:
        self.targets = targets
        self.probes = {name: Probe() for name in targets}
        self.saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> Probes:
        for name, (cls, method, items) in self.targets.items():
            original = cls.__dict__.get(method)
            if original is None:
                continue
            self.saved.append((cls, method, original))
            setattr(cls, method, self.wrap(original, self.probes[name], items))
        return self

    @staticmethod
    def wrap(original: Any, probe: Probe, items: Callable[..., int]) -> Any:
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                probe.seconds += time.perf_counter() - start
                probe.calls += 1
                with contextlib.suppress(Exception):
                    probe.items += items(*args, **kwargs)

        return timed

    def __exit__(self, *exc: object) -> None:
        for cls, method, original in reversed(self.saved):
            setattr(cls, method, original)


def sync() -> None:
    if cuda_available():
        import torch

        torch.cuda.synchronize()


def _batch_of(key: str, position: int) -> Callable[..., int]:
    def items(*args: Any, **kwargs: Any) -> int:
        value = kwargs.get(key, args[position] if len(args) > position else None)
        return int(value.shape[0]) if value is not None and hasattr(value, "shape") else 0

    return items


def probe_targets() -> dict[str, tuple[type, str, Callable[..., int]]]:
    """The model calls whose time the projection scales: one entry per kind of unit."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTextModelWithProjection
    from transformers.generation.utils import GenerationMixin

    return {
        "text_embedding": (CLIPTextModelWithProjection, "forward", _batch_of("input_ids", 1)),
        "unet": (UNet2DConditionModel, "forward", _batch_of("sample", 1)),
        "vae_decode": (AutoencoderKL, "decode", _batch_of("z", 1)),
        "safety_checker": (StableDiffusionSafetyChecker, "forward", _batch_of("clip_input", 1)),
        "generate": (GenerationMixin, "generate", _batch_of("pixel_values", 1)),
    }


def matmul_flops_per_s(seconds: float = 0.5) -> float:
    """fp32 matmul throughput of this machine (the device the rehearsal ran on), measured now."""
    import torch

    device = "cuda" if cuda_available() else "cpu"
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    sync()
    return 2.0 * n**3 * done / (time.perf_counter() - start)


def trim_heap() -> None:
    """Give freed heap back to the OS, so that the next peak measures only new allocations."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def hardware() -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    if cuda_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info
