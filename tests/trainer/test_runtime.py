"""The trainer process keeps freed activation-sized blocks for reuse instead of faulting their pages in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

# Rounds of 20 blocks of 16 MiB, allocated, written and freed: a step's activations in miniature.
ROUNDS = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "trainer":
    from kubetune_trainer.runtime import init_runtime
    init_runtime()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(2 << 20) for _ in range(20)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def page_faults_per_round(mode: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True, env=env, timeout=120
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_trainer_reuses_freed_blocks_where_the_default_allocator_faults_them_in_every_step() -> None:
    default = page_faults_per_round("default")
    trainer = page_faults_per_round("trainer")
    first = trainer[0]  # (the kernel may map several pages per fault: compare counts, not pages)
    assert min(default[1:]) > first // 2, default  # the default hands the blocks back and faults them in again
    assert max(trainer[1:]) < first // 20, trainer  # after the first round the same memory serves every round
