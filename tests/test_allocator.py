"""hybridlm keeps glibc's heap for large tensors (allocator.py): a freed block is reused without page faults,
and a process that chose its own malloc settings is left alone."""
import json
import os
import subprocess
import sys

import pytest

from hybridlm import allocator

# 64 MiB tensors, made, written and freed five times; the minor page faults of the last four (glibc may place
# the second block beside the first before it reuses one)
CHILD = """
import json, resource, torch, hybridlm
from hybridlm import allocator
faults = []
for i in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults[1:], "state": allocator.state}))
"""


def run_child(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in allocator._USER_SETTINGS and k != "LD_PRELOAD"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's mallopt only")
def test_large_tensors_reuse_the_heap_unless_the_environment_chose():
    kept = run_child({})
    assert kept["state"].startswith("glibc heap kept for reuse"), kept["state"]
    # 64 MiB is 16,384 pages: a fresh mmap faults on each; the kept heap hands back pages already touched
    assert min(kept["faults"]) < 1000, kept

    chosen = run_child({"MALLOC_ARENA_MAX": "4"})
    assert chosen["state"] == "as the environment sets: MALLOC_ARENA_MAX=4"
    assert min(chosen["faults"]) > 10000, chosen      # glibc's own thresholds: an mmap per 64 MiB block


def test_user_choice_names_every_setting(monkeypatch):
    for k in allocator._USER_SETTINGS + ("LD_PRELOAD", "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    assert allocator.user_choice() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.nns=2")      # not a malloc tunable
    assert allocator.user_choice() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert allocator.user_choice() == ("GLIBC_TUNABLES=glibc.malloc.trim_threshold=1, "
                                       "LD_PRELOAD=/usr/lib/libjemalloc.so.2")
