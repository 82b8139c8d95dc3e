"""The chaos soak's short form (scripts/chaos_soak.py --short): a sweep on a loopback cluster
while worker nodes are SIGKILLed and re-added and the MLflow server restarts loses no step,
logs none twice, leaves no duplicate or orphan run and no unreadable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(960)
def test_short_chaos_soak_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chaos_soak.py"), "--short", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures["trials completed"] == figures["trials"] == 8
    for name in (
        "steps lost",
        "steps logged twice",
        "duplicate MLflow runs",
        "orphan MLflow runs",
        "checkpoints unreadable",
    ):
        assert figures[name] == 0, (name, figures)
    # The faults really happened: at least one node loss and the server restart.
    assert any("SIGKILLed" in event for event in figures["faults"]), figures["faults"]
    assert any("MLflow server restarted" in event for event in figures["faults"])
