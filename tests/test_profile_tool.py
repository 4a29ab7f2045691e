"""tools/profile_calibration.py on a real (small) backbone and table: its parts add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_frame

ROOT = Path(__file__).resolve().parents[1]


def test_profile_parts_add_up(tmp_path: Path, backbone_path: Path) -> None:
    table = tmp_path / "sites.csv"
    make_frame({"IA-001": "IA", "IA-002": "IA"}, years=(2003, 2004, 2005)).to_csv(
        table, index=False, date_format="%Y-%m-%d")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_calibration.py"), "--data", str(table),
                           "--site", "IA", "--backbone", str(backbone_path), "--epochs", "3",
                           "--batch-size", "2", "--out", str(tmp_path / "p.prof")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    parts = report["seconds"]
    assert report["epochs_run"] == 3 and report["batch_size"] == 2
    assert report["steps"] > 0 and report["steps"] % 3 == 0  # the same batches every epoch
    assert 0 < parts["forward_and_loss"] + parts["backward"] + parts["optimizer"] <= parts["train_steps"]
    assert parts["train_steps"] + parts["validation"] <= parts["epoch_loop"] <= report["wall_s"]
    assert abs(parts["epoch_loop"] + parts["start_up_and_writing"] - report["wall_s"]) < 1e-2
    assert (tmp_path / "p.prof").stat().st_size > 0
