"""Benchmark helpers shared by ``benchmarks/`` scripts and the ``hybridlm bench`` command: the machine
description every result carries, and peak-memory reading."""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. Linux's VmHWM is per address space, so a child
    started by a large parent does not inherit the parent's peak (getrusage's ru_maxrss survives exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def environment() -> dict:
    """Machine, torch version, threads and commit: printed with every result."""
    import torch

    from . import kernels
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": sys.version.split()[0], "commit": git_commit(), "kernels": kernels.report()}


def environment_md(env: dict) -> str:
    k = env["kernels"]
    kern = ", ".join(f"{op}: {how}" for op, how in k.items() if op != "backend")
    return (f"- machine: {env['cpu']}, {env['cores']} cores, {env['threads']} torch threads\n"
            f"- torch {env['torch']}, Python {env['python']}, hybridlm commit {env['commit']}\n"
            f"- kernels: {kern}\n")
