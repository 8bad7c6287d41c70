"""The documentation's example runs and prints what the documentation shows (docs/inspection.md, 2 ranks)."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_inspection_example_prints_what_the_docs_show(tmp_path):
    doc = (REPO / "docs" / "inspection.md").read_text()
    script = tmp_path / "inspect_attention.py"
    script.write_text(re.search(r"```python\n(.*?)```", doc, re.S).group(1))
    shown = re.search(r"```console\n\$ torchrun --nproc_per_node 2 inspect_attention.py\n(.*?)```", doc, re.S).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timing = re.compile(r"in [\d.]+ s$")  # the loading time varies
    printed = [timing.sub("in _ s", line) for line in proc.stdout.splitlines()]
    assert printed == [timing.sub("in _ s", line) for line in shown.splitlines()]
