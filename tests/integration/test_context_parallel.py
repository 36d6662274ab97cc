"""Context-parallel attention over real torchrun/gloo ranks equals unsharded attention."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import REPO, train_command


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_attention_equals_unsharded_attention(tmp_path, cp):
    """Output and gradients of q, k and v of every rank's share, for 3 document layouts,
    both masks and both balancing modes (see cp_worker.py), within fp32 rounding."""
    out = tmp_path / "errors.json"
    cmd, env = train_command(nproc=cp)
    cmd = cmd[:-1] + [str(REPO / "tests" / "integration" / "cp_worker.py"), str(out)]
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = json.loads(out.read_text())
    assert len(errors) == 12
    for case, worst in errors.items():
        assert set(worst) == {"out", "dq", "dk", "dv"}
        assert max(worst.values()) < 1e-5, (case, worst)
