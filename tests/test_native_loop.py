"""The C++ day loop (kgml_peft.model.native) against the Python loop it replaces: the same bits
for a GRU layer's outputs and gradients and for a whole calibration's adapter; turned off through
the environment; and a build that fails (no usable compiler) warning once and falling back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kgml_peft.cli import cli
from kgml_peft.model import native
from kgml_peft.model.recurrence import gru_layer
from tests.test_cli_validation import _runner
from tests.conftest import make_frame

ROOT = Path(__file__).resolve().parents[1]
needs_build = pytest.mark.skipif(not native.status().available,
                                 reason=f"the C++ day loop does not build here: {native.status().reason}")


def _layer_run(dtype: torch.dtype, groups: int, last_only: bool) -> list[torch.Tensor]:
    """Outputs and every gradient of one gru_layer call (12 rows, 40 days, hidden 5)."""
    gen = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    gi, h0, b = make(12, 40, 15), make(12, 5), make(15)
    w = make(*((groups,) if groups else ()), 15, 5)
    seq, last = gru_layer(gi, h0, w, b)
    loss = last.square().sum() if last_only else (seq * torch.linspace(-1, 1, 40, dtype=dtype)[:, None]).sum()
    loss.backward()
    return [seq.detach(), last.detach(), gi.grad, h0.grad, w.grad, b.grad]


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups", [0, 3])
@pytest.mark.parametrize("last_only", [False, True])
def test_cpp_loops_give_the_python_loops_outputs_and_gradients_to_the_bit(dtype, groups, last_only):
    with native.enabled(True):
        compiled = _layer_run(dtype, groups, last_only)
    with native.enabled(False):
        python = _layer_run(dtype, groups, last_only)
    for a, b in zip(compiled, python):
        assert a.dtype == dtype and torch.equal(a, b)
    assert compiled[0].abs().sum() > 0 and compiled[4].abs().sum() > 0  # something was computed


@needs_build
def test_a_calibration_writes_the_same_adapter_tensors_with_either_loop(tmp_path, backbone_path, monkeypatch):
    """The whole command (training steps through the loop's forward and backward, validation,
    early stopping) with the C++ loop and with KGML_PEFT_NATIVE=0: identical adapter files' tensors."""
    table = tmp_path / "sites.csv"
    make_frame({"IA-001": "IA", "IA-002": "IA"}, years=(2003, 2004, 2005)).to_csv(
        table, index=False, date_format="%Y-%m-%d")
    tensors = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(native.ENVIRONMENT, flag)
        out = tmp_path / f"native-{flag}"
        result = _runner().invoke(cli, ["calibrate", "--data", str(table), "--backbone", str(backbone_path),
                                        "--out", str(out), "--site", "IA", "--epochs", "3", "--batch-size", "2", "--quiet",
                                        "--cv", "none", "--seed", "5"])
        assert result.exit_code == 0, result.output
        (path,) = out.glob("*.safetensors")
        tensors[flag] = load_file(path)
    assert tensors["1"].keys() == tensors["0"].keys() and tensors["1"]
    assert all(torch.equal(tensors["1"][k], tensors["0"][k]) for k in tensors["1"])
    assert any(bool(t.abs().sum() > 0) for t in tensors["1"].values())


_PROBE = """
import json, warnings, torch
from kgml_peft.model import native
from kgml_peft.model.recurrence import gru_layer
gen = torch.Generator().manual_seed(0)
args = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((3, 7, 6), (3, 2), (6, 2), (6,))]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = gru_layer(*args)[0]
    second = gru_layer(*args)[0]  # a failed build is not tried again
with native.enabled(False):
    python = gru_layer(*args)[0]
status = native.status()
print(json.dumps({"available": status.available, "reason": status.reason,
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                  "same": bool(torch.equal(first, python) and torch.equal(second, python))}))
"""


def _probe(tmp_path: Path, **env: str) -> tuple[dict, str]:
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), **env}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_turned_off_through_the_environment_nothing_is_built_and_the_python_loop_runs(tmp_path):
    report, stderr = _probe(tmp_path, KGML_PEFT_NATIVE="0")
    assert report["available"] is False and native.ENVIRONMENT in report["reason"]
    assert report["warnings"] == [] and report["same"] is True
    assert "compiling" not in stderr and not (tmp_path / "extensions").exists()


def test_a_build_that_fails_warns_once_and_the_python_loop_runs(tmp_path):
    """No usable C++ compiler (``CXX`` that only fails) and an empty extension cache: the one-time
    compile notice, one warning with the reason, the Python loop's results, no build left."""
    report, stderr = _probe(tmp_path, KGML_PEFT_NATIVE="1", CXX="/bin/false")
    assert report["available"] is False and "/bin/false" in report["reason"]
    assert len(report["warnings"]) == 1 and "could not be built" in report["warnings"][0]
    assert report["same"] is True
    assert "compiling the GRU day loop" in stderr
    assert not list((tmp_path / "extensions").rglob("*.so"))


def test_a_stale_build_lock_is_removed_and_a_fresh_one_is_left_alone(tmp_path):
    """A lock left by a process killed while building would make every later build wait forever;
    a fresh one belongs to a build running now."""
    lock = tmp_path / "lock"
    assert native.remove_stale_lock(lock) is False  # none there
    lock.touch()
    assert native.remove_stale_lock(lock) is False and lock.exists()
    old = lock.stat().st_mtime - native.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    assert native.remove_stale_lock(lock) is True and not lock.exists()
