"""Hostile values through the real command line (issue 20, classes 6, 7 and 8):

* sizes that would allocate gigabytes or overflow (``--rank``, ``--bottleneck``, ``--head-hidden``
  of 1e8, 1e11, 2**63; ``--threads`` and ``KGML_PEFT_THREADS``; batch sizes and counts) are refused
  before anything is allocated;
* files with a valid hash whose outputs overflow (an adapter with a huge head, a backbone with
  huge weights) are refused by ``adapters verify``/``import``/``export`` and by ``predict`` and
  ``evaluate``, which name the file responsible and write nothing;
* adapters whose unhashed ``metrics`` hold strings where numbers belong are refused when read
  (``adapters list`` marks them unreadable).

Every error row: exit code 2, exactly one ``error:`` line, no traceback, no file created, every
earlier file byte for byte the same with the same modification time (the harness of
``test_bad_input_matrix.py``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from kgml_peft.cli import cli
from kgml_peft.store.adapter import Adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone, save_backbone
from tests.conftest import random_adapter
from tests.test_bad_input_matrix import MEnv, _mtimes
from tests.test_cli_validation import _runner, _snapshot, check_user_error

#: 1e8 (about 13 GB of LoRA factors), 1e11, 2**63 (beyond int64), by row-id label
HUGE = {"1e8": "100000000", "1e11": "100000000000", "2e63": str(2**63)}


@dataclass
class Row:
    setup: Callable[[MEnv], list[str]]
    expect: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


def row(id: str, setup: Callable[[MEnv], list[str]], *expect: str, env: dict[str, str] | None = None):
    return pytest.param(Row(setup, expect, env or {}), id=id)


# --- hostile files with valid hashes -----------------------------------------------------------


def _adapter(env: MEnv, edit: Callable[[Adapter], None], backbone: Path | None = None,
             name: str = "hostile.safetensors") -> Path:
    """A random adapter for ``backbone`` (default: the case's), edited, then saved: its content
    hash and parameter count are right, only its values (or metadata) are hostile."""
    adapter = random_adapter(load_backbone(backbone or env.backbone), "IA-001")
    edit(adapter)
    return save_adapter(env.folder("inputs") / name, adapter)


def _huge_scale(adapter: Adapter) -> None:
    adapter.tensors["head.scale"] = torch.full_like(adapter.tensors["head.scale"], 1e38)


def _huge_shift(adapter: Adapter) -> None:
    """Finite outputs, but 1e30 gC m-2 d-1: squared errors would print as inf."""
    adapter.tensors["head.shift"] = torch.full_like(adapter.tensors["head.shift"], 1e30)


def _metrics(metrics: dict) -> Callable[[Adapter], None]:
    return lambda adapter: adapter.info.update(metrics=metrics)


STRING_LOSS = _metrics({"before": {"loss": "high"}, "after": {"loss": "low"}})
STRING_MSE = _metrics({"after": {"mse": {"NEE": "0.3"}}})
STRING_CV = _metrics({"cv": {"folds": ["2003"], "change_mean": "-5%", "strength": 1.0}})
LIST_CROPS = _metrics({"cv": {"folds": "2003,2004", "crops": [0.0]}})


def _huge_backbone(env: MEnv) -> Path:
    """The case's backbone with the NEE head's bias at 1e30, saved (and fingerprinted) anew."""
    backbone = load_backbone(env.backbone)
    with torch.no_grad():
        backbone.model.nee_out.bias.fill_(1e30)
    path = env.folder("inputs") / "huge.safetensors"
    save_backbone(path, backbone.model, backbone.scalers, {})
    return path


def _import(adapter: Path, env: MEnv, backbone: Path | None = None) -> list[str]:
    return ["adapters", "import", str(adapter), "--store", str(env.folder("store")),
            "--backbone", str(backbone or env.backbone)]


def _predict_store(env: MEnv, edit: Callable[[Adapter], None], *extra: str) -> list[str]:
    """``predict`` with a store whose adapter for IA-001 (copied in, not imported) is hostile."""
    return env.predict(*extra, store=env.store(_adapter(env, edit)))


def _on_huge_backbone(env: MEnv, command: str) -> list[str]:
    """``adapters verify|import`` of an ordinary adapter made for the overflowing backbone: the
    backbone, not the adapter, is named."""
    backbone = _huge_backbone(env)
    adapter = _adapter(env, lambda a: None, backbone, name="for-huge.safetensors")
    return env.verify(adapter, backbone) if command == "verify" else _import(adapter, env, backbone)


def _calibrate(*extra: str) -> Callable[[MEnv], list[str]]:
    return lambda env: env.calibrate("--site", "IA-001", *extra)


def _toml(text: str, *command: str) -> Callable[[MEnv], list[str]]:
    def setup(env: MEnv) -> list[str]:
        path = env.folder("inputs") / "config.toml"
        path.write_text(text)
        return [*command, "--config", str(path)] if command[0] != "calibrate" else \
            env.calibrate("--site", "IA-001", "--config", str(path))
    return setup


def _pretrain_toml(text: str) -> Callable[[MEnv], list[str]]:
    def setup(env: MEnv) -> list[str]:
        path = env.folder("inputs") / "pretrain.toml"
        path.write_text(text)
        return env.pretrain("--config", str(path))
    return setup


def _bench(*extra: str) -> Callable[[MEnv], list[str]]:
    return lambda env: ["bench", "--backbone", str(env.backbone), "--cpu", "--quiet", *extra]


SIZE_ROWS = [
    *[row(f"calibrate-rank-{k}", _calibrate("--rank", n), "lora_rank", "choose a rank <= 8") for k, n in HUGE.items()],
    *[row(f"calibrate-bottleneck-{k}", _calibrate("--bottleneck", n), "bottleneck must be <= 4096")
      for k, n in HUGE.items()],
    *[row(f"calibrate-head-hidden-{k}", _calibrate("--head", "mlp", "--head-hidden", n),
          "head_hidden must be <= 4096") for k, n in HUGE.items()],
    row("calibrate-rank-toml", _toml("[adapter]\nlora_rank = 100000000000\n", "calibrate"),
        "lora_rank 100000000000 exceeds", "choose a rank <= 8"),
    row("calibrate-rank-above-hidden", _calibrate("--rank", "9"), "lora_rank 9 exceeds", "choose a rank <= 8"),
    row("calibrate-batch-size", _calibrate("--batch-size", "100000000000"), "batch_size must be <= 100000"),
    row("calibrate-epochs", _calibrate("--epochs", "100000000000"), "epochs must be <= 100000"),
    row("calibrate-members", _calibrate("--members", "100000000000"), "members must be <= 1000"),
    row("calibrate-prior-k", _calibrate("--prior-k", "100000000000"), "prior_k must be <= 1000"),
    row("calibrate-batch-sites", _calibrate("--batch-sites", "100000000000"), "batch_sites must be <= 10000"),
    row("threads-option", lambda env: ["--threads", "99999999999", "adapters", "list", "--store",
                                       str(env.folder("store"))], "--threads", "1<=x<=1024"),
    row("threads-env", lambda env: ["adapters", "list", "--store", str(env.folder("store"))],
        "--threads", "1<=x<=1024", env={"KGML_PEFT_THREADS": "99999999999"}),
    row("threads-env-2-63", lambda env: ["evaluate", "--data", str(env.data()), "--backbone", str(env.backbone)],
        "--threads", env={"KGML_PEFT_THREADS": str(2**63)}),
    row("predict-batch-size", lambda env: env.predict("--batch-size", "100000000000"),
        "batch size must be an integer in [1, 100000]"),
    row("predict-neighbours", lambda env: env.predict("--site-column", "site", "--neighbours", "100000000000"),
        "number of neighbours must be an integer >= 1 and <= 1000"),
    row("bench-sites", _bench("--sites", "100000000000"), "bench sites must be an integer in [1, 1000]"),
    row("bench-memory-adapters", _bench("--memory-adapters", "100000000000"), "bench memory_adapters"),
    row("bench-repeats", _bench("--repeats", "100000000000"), "bench repeats"),
    row("bench-processes", _bench("--processes", "100000000000"), "bench processes"),
    row("experiment-jobs", lambda env: ["experiment", "--data", str(env.data()), "--out", "results", "--quick",
                                        "--jobs", "100000000000", "--quiet", "--cpu"],
        "jobs must be an integer in [1, 1024]"),
    row("pretrain-hidden-size", _pretrain_toml("[backbone]\nhidden_size = 100000000000\n"),
        "backbone hidden_size must be <= 4096"),
    row("pretrain-phase-batch-size",
        _pretrain_toml('[[phases]]\nname = "a"\ndata = "synthetic"\ntargets = { Ra = 1.0 }\n'
                       "batch_size = 100000000000\n"), "phase a: batch_size must be <= 100000"),
]

OVERFLOW_ROWS = [
    row("verify-adapter-overflow", lambda env: env.verify(_adapter(env, _huge_scale)),
        "adapter ", "hostile.safetensors", "predicts non-finite or overflowing"),
    row("verify-adapter-huge-finite", lambda env: env.verify(_adapter(env, _huge_shift)),
        "hostile.safetensors", "predicts non-finite or overflowing"),
    row("import-adapter-overflow", lambda env: _import(_adapter(env, _huge_scale), env),
        "hostile.safetensors", "predicts non-finite or overflowing"),
    row("import-adapter-huge-finite", lambda env: _import(_adapter(env, _huge_shift), env),
        "hostile.safetensors", "predicts non-finite or overflowing"),
    row("export-adapter-overflow",
        lambda env: ["adapters", "export", str(_adapter(env, _huge_scale)), str(env.folder("share")),
                     "--backbone", str(env.backbone)], "hostile.safetensors", "predicts non-finite"),
    row("predict-adapter-overflow-site", lambda env: _predict_store(env, _huge_scale, "--site", "IA-001"),
        "adapter ", "IA-001.safetensors", "predicts non-finite or overflowing"),
    row("predict-adapter-overflow-column", lambda env: _predict_store(env, _huge_shift, "--site-column", "site"),
        "IA-001.safetensors", "predicts non-finite or overflowing"),
    row("predict-backbone-huge",
        lambda env: ["predict", "--data", str(env.data()), "--backbone", str(_huge_backbone(env)), "--out",
                     "pred.csv", "--adapters", str(env.folder("store")), "--quiet", "--cpu"],
        "backbone ", "huge.safetensors", "predicts non-finite or overflowing NEE"),
    row("evaluate-backbone-huge",
        lambda env: ["evaluate", "--data", str(env.data()), "--backbone", str(_huge_backbone(env))],
        "backbone ", "huge.safetensors", "predicts non-finite or overflowing NEE"),
    row("evaluate-backbone-huge-json",
        lambda env: ["evaluate", "--data", str(env.data()), "--backbone", str(_huge_backbone(env)), "--json"],
        "huge.safetensors", "overflowing"),
    row("verify-on-huge-backbone", lambda env: _on_huge_backbone(env, "verify"), "backbone ", "huge.safetensors"),
    row("import-on-huge-backbone", lambda env: _on_huge_backbone(env, "import"), "backbone ", "huge.safetensors"),
]

METADATA_ROWS = [
    *[row(f"{command}-metrics-{name}", setup, "metadata field 'metrics'", what)
      for name, edit, what in (("string-loss", STRING_LOSS, "before.loss must be a finite number"),
                               ("string-mse", STRING_MSE, "after.mse must map target names"),
                               ("string-cv", STRING_CV, "cv.change_mean must be a finite number"),
                               ("folds-string", LIST_CROPS, "cv.folds must be a JSON list"))
      for command, setup in (
          ("import", lambda env, edit=edit: _import(_adapter(env, edit), env)),
          ("show", lambda env, edit=edit: ["adapters", "show", str(_adapter(env, edit))]),
          ("verify", lambda env, edit=edit: env.verify(_adapter(env, edit))),
          ("predict", lambda env, edit=edit: _predict_store(env, edit, "--site", "IA-001")))],
    row("show-json-metrics-string-loss", lambda env: ["adapters", "show", str(_adapter(env, STRING_LOSS)), "--json"],
        "before.loss must be a finite number"),
    row("predict-column-metrics-string-crops",
        lambda env: _predict_store(env, _metrics({"cv": {"crops": ["maize"]}}), "--site-column", "site"),
        "cv.crops must be a JSON list of Crop_Type codes"),
]

ROWS = [*SIZE_ROWS, *OVERFLOW_ROWS, *METADATA_ROWS]


@pytest.fixture(scope="module")
def valid_adapters(backbone_path: Path, other_backbone_path: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Valid adapters (random tensors) for the tiny backbone and for the other one."""
    folder = tmp_path_factory.mktemp("hostile")
    ours = save_adapter(folder / "ours.safetensors", random_adapter(load_backbone(backbone_path), "IA-001"))
    theirs = save_adapter(folder / "theirs.safetensors",
                          random_adapter(load_backbone(other_backbone_path), "IA-001", seed=1))
    return ours, theirs


def _env(tmp_path: Path, backbone_path: Path, other_backbone_path: Path, valid_adapters) -> MEnv:
    inputs = tmp_path / "inputs"
    inputs.mkdir(parents=True)
    copies = [inputs / name for name in ("backbone.safetensors", "IA-001.safetensors", "other.safetensors",
                                         "IA-001-other.safetensors")]
    sources = (backbone_path, valid_adapters[0], other_backbone_path, valid_adapters[1])
    for source, target in zip(sources, copies):
        shutil.copyfile(source, target)
    return MEnv(tmp_path, *copies)


@pytest.mark.parametrize("spec", ROWS)
@pytest.mark.usefixtures("isolated_globals")
def test_hostile_value_is_one_line_and_writes_nothing(spec: Row, tmp_path: Path, backbone_path: Path,
                                                      other_backbone_path: Path, valid_adapters,
                                                      monkeypatch) -> None:
    work = tmp_path / "work"
    monkeypatch.chdir(tmp_path)
    env = _env(work, backbone_path, other_backbone_path, valid_adapters)
    monkeypatch.chdir(work)
    args = spec.setup(env)
    before, mtimes = _snapshot(tmp_path), _mtimes(tmp_path)

    result = _runner().invoke(cli, args, catch_exceptions=True, env=spec.env)
    check_user_error(result, args, spec.expect, tmp_path, before)
    assert _mtimes(tmp_path) == mtimes, "a file was rewritten (same bytes, new modification time)"


def test_list_marks_bad_metrics_unreadable(tmp_path: Path, backbone_path: Path, other_backbone_path: Path,
                                           valid_adapters, monkeypatch) -> None:
    """``adapters list`` goes on past an adapter whose metrics hold strings: that row says why it
    is unreadable, the valid adapter is listed as usual, exit 0."""
    env = _env(tmp_path / "work", backbone_path, other_backbone_path, valid_adapters)
    monkeypatch.chdir(env.tmp)
    store = env.store()
    for name, edit in (("A", STRING_LOSS), ("B", STRING_MSE), ("C", STRING_CV), ("D", LIST_CROPS)):
        shutil.copyfile(_adapter(env, edit), store / f"{name}.safetensors")
    before = _snapshot(tmp_path)
    for extra in ([], ["--json"]):
        result = _runner().invoke(cli, ["adapters", "list", "--store", str(store), *extra], catch_exceptions=True)
        assert result.exit_code == 0 and "Traceback" not in result.output, (result.output, result.exception)
        assert result.output.count("metadata field 'metrics'") == 4, result.output
        assert "IA-001" in result.output
    assert _snapshot(tmp_path) == before


def test_realistic_adapters_pass_the_probe(tmp_path: Path, backbone_path: Path, adapter_path: Path,
                                           valid_adapters, monkeypatch) -> None:
    """The probe refuses overflow, not ordinary adapters: a trained and a random adapter verify,
    import and predict as before."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    runner = _runner()
    for adapter in (adapter_path, valid_adapters[0]):
        result = runner.invoke(cli, ["adapters", "verify", str(adapter), "--backbone", str(backbone_path)])
        assert result.exit_code == 0 and result.output.startswith("ok: "), result.output
    result = runner.invoke(cli, ["adapters", "import", str(adapter_path), "--store", "store",
                                 "--backbone", str(backbone_path)])
    assert result.exit_code == 0, result.output
    data = MEnv(tmp_path, backbone_path).data()
    result = runner.invoke(cli, ["predict", "--data", str(data), "--backbone", str(backbone_path), "--out",
                                 "pred.csv", "--adapters", "store", "--site-column", "site", "--quiet", "--cpu"])
    assert result.exit_code == 0 and (tmp_path / "pred.csv").is_file(), result.output


def test_enough_rows() -> None:
    ids = [p.id for p in ROWS]
    assert len(ids) == len(set(ids)) and len(SIZE_ROWS) >= 20 and len(OVERFLOW_ROWS) >= 10
    assert len(METADATA_ROWS) >= 16
