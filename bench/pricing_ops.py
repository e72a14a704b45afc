"""Instructions per call of each pricing step on the request path, under valgrind's callgrind.

The steps every answered request runs (issue 23): read the upstream's OpenAI usage object
(`Usage.from_openai`), make a Usage, price it (`usage_cost`), add it to the request's usage
(`Usage.add`), and for a budgeted request the reservation's worst case (`worst_case_cost`).
Each is run ITERATIONS times in a process of its own and counted against a process that runs
nothing, so the figure is the step's own (±50 instructions). Run it on two trees (PYTHONPATH)
to compare them:

    python -m bench.pricing_ops            # this tree
    PYTHONPATH=/tmp/old python bench/pricing_ops.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ITERATIONS = 20_000
STEPS = ("none", "usage", "parse", "parse_detailed", "cost", "worst", "add")

_CHILD = """
import sys
from sidecar.providers.base import Usage
from sidecar.pricing import usage_cost, worst_case_cost
from sidecar.routing import Candidate
from sidecar.settings.model import Price, ProviderSettings

provider = ProviderSettings("openai", "openai", None, None)
candidate = Candidate("fc:openai/m", provider, "m", None, Price(0.15, 0.6), "fc:openai/m")
plain = {"prompt_tokens": 480, "completion_tokens": 120, "total_tokens": 600}
detailed = {**plain, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}}
usage, total = Usage.from_openai(plain), Usage()
steps = {
    "none": lambda: None,
    "usage": lambda: Usage(480, 120),
    "parse": lambda: Usage.from_openai(plain),
    "parse_detailed": lambda: Usage.from_openai(detailed),
    "cost": lambda: usage_cost(candidate, usage),
    "worst": lambda: worst_case_cost(candidate, 2000, 500),
    "add": lambda: total.add(usage),
}
step = steps[sys.argv[1]]
for _ in range(int(sys.argv[2])):
    step()
"""


def _count(script: Path, step: str, iterations: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, str(script), step, str(iterations)],
            capture_output=True, text=True, check=True, env=os.environ,
        )  # fmt: skip
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(out.stderr)
    return int(found[1])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "steps.py"
        script.write_text(_CHILD)
        _count(script, "none", 0)  # compiles what is imported, once
        idle = _count(script, "none", ITERATIONS)
        for step in STEPS[1:]:
            per_call = (_count(script, step, ITERATIONS) - idle) / ITERATIONS
            print(f"{step:<16} {per_call:7.0f} instructions per call", flush=True)


if __name__ == "__main__":
    main()
