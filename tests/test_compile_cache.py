"""torch.compile's graphs outlive the process in unicom's compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

COMPILE_ONCE = """
import json, torch
from unicom.engine.device import compile_cache
folder = compile_cache()
step = torch.compile(lambda x: (x * 2).sin().sum())
step(torch.randn(16))
from torch._dynamo.utils import counters
print(json.dumps({"folder": str(folder), "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _compile_in_a_new_process(cache) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["UNICOM_CACHE"] = str(cache)
    done = subprocess.run([sys.executable, "-c", COMPILE_ONCE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_graph_from_the_cache(tmp_path):
    first = _compile_in_a_new_process(tmp_path)
    assert first["folder"] == str((tmp_path / "inductor").resolve())
    assert first["misses"] == 1 and first["hits"] == 0
    second = _compile_in_a_new_process(tmp_path)
    assert second["hits"] == 1 and second["misses"] == 0
