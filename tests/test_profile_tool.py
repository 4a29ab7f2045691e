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


def test_epoch_study_replays_early_stopping_as_training_does() -> None:
    """tools/epoch_study.py's replay against the training loop's own close_epoch, on curves with
    ties, late improvements and none at all."""
    import importlib.util

    from kgml_peft.train.loop import close_epoch
    from kgml_peft.train.state import PhaseResult

    spec = importlib.util.spec_from_file_location("epoch_study", ROOT / "tools" / "epoch_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    curves = [[1.0, 0.9, 0.9, 0.95, 0.8, 0.85, 0.86, 0.87, 0.7, 0.71],
              [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
              [1.0, 0.9, 0.8, 0.7, 0.6]]
    for curve in curves:
        for patience in (0, 1, 2, 3, 30):
            result = PhaseResult(name="t")  # as fit() starts: epoch 0 validated before any step
            result.curve.append({"phase": "t", "epoch": 0, "step": 0, "train_loss": None, "val_loss": curve[0]})
            result.best_val_loss, stale, ran = curve[0], 0, len(curve) - 1
            for epoch, loss in enumerate(curve[1:], start=1):
                _, stale, stop = close_epoch(result, epoch, epoch, 0.0, loss, stale, patience)
                if stop:
                    ran = epoch
                    break
            assert study.replay(curve, patience) == (ran, result.best_val_loss), (curve, patience)
