"""Bad input to ``calibrate`` and ``adapters ...``: exit code 2, one ``error:`` line, no file
created or changed. Same harness and checks as ``test_cli_validation.py``."""

from __future__ import annotations

import pickle
import subprocess
import sys
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import make_frame
from tests.test_cli_validation import (
    MARKER,
    _touch,
    Case,
    Env,
    Evil,
    _runner,
    _snapshot,
    case,
    check_user_error,
    drop,
    scale,
    setv,
)
from kgml_peft.cli import cli


@dataclass
class AEnv(Env):
    """The validation harness's environment plus a valid adapter and a second backbone."""

    adapter: Path = Path()
    other: Path = Path()

    def calibrate(self, *extra: str, data: Path | None = None, out: Path | None = None) -> list[str]:
        if out is None:
            out = self.tmp / "adapters"
            out.mkdir(exist_ok=True)
        return ["calibrate", "--data", str(data or self.data()), "--backbone", str(self.backbone),
                "--out", str(out), "--epochs", "1", "--quiet", *extra]

    def copy_adapter(self, name: str = "IA-001.safetensors", folder: str = "") -> Path:
        target = self.tmp / folder / name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(self.adapter, target)
        return target

    def edited_adapter(self, edit: Callable[[dict, dict], None]) -> Path:
        with safe_open(str(self.adapter), framework="pt") as handle:
            metadata = dict(handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        edit(tensors, metadata)
        path = self.tmp / "edited.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        return path


def _existing_adapter(env: AEnv) -> list[str]:
    (env.tmp / "adapters").mkdir(exist_ok=True)
    (env.tmp / "adapters" / "IA.safetensors").write_bytes(b"a good adapter")
    return env.calibrate("--site", "IA")


def _config(text: str) -> Callable[[AEnv], list[str]]:
    def setup(env: AEnv) -> list[str]:
        path = env.tmp / "calib.toml"
        path.write_text(text)
        return env.calibrate("--site", "IA", "--config", str(path))
    return setup


def _verify(make: Callable[[AEnv], Path], other: bool = False) -> Callable[[AEnv], list[str]]:
    return lambda env: ["adapters", "verify", str(make(env)), "--backbone",
                        str(env.other if other else env.backbone)]


def _truncated_adapter(env: AEnv) -> Path:
    path = env.copy_adapter()
    path.write_bytes(path.read_bytes()[:-30])
    return path


def _text_file(env: AEnv) -> Path:
    path = env.tmp / "notes.safetensors"
    path.write_text("these are my notes, not an adapter\n")
    return path


def _pickle_payload(env: AEnv) -> Path:
    path = env.tmp / "IA.safetensors"
    path.write_bytes(pickle.dumps(Evil(env.tmp / MARKER)))
    return path


def _one_region_one_year():
    """IA-001 has three years, IL-001 one: IA could be calibrated, IL cannot; nothing is written."""
    three = make_frame({"IA-001": "IA"}, years=(2003, 2004, 2005))
    return pd.concat([three, make_frame({"IL-001": "IL"}, years=(2003,))], ignore_index=True)


def _blank_last_year():
    frame = make_frame(years=(2003, 2004, 2005))
    frame.loc[frame["date"].dt.year == 2005, ["Ra", "Rh", "NEE", "Reco", "Yield"]] = np.nan
    return frame


def _bad_region(f):
    f.loc[f["site"] == "IL-001", "region"] = "I/L"
    return f


def _import(env: AEnv, store: str = "store", other: bool = False, make_store: bool = True) -> list[str]:
    if make_store:
        (env.tmp / store).mkdir(exist_ok=True)
    return ["adapters", "import", str(env.copy_adapter(folder="inbox")), "--store", str(env.tmp / store),
            "--backbone", str(env.other if other else env.backbone)]


def _import_existing(env: AEnv) -> list[str]:
    args = _import(env)
    (env.tmp / "store" / "IA-001.safetensors").write_bytes(b"the colleague's older adapter")
    return args


def _export_existing(env: AEnv) -> list[str]:
    (env.tmp / "share").mkdir()
    (env.tmp / "share" / "IA-001.safetensors").write_bytes(b"already shared")
    return ["adapters", "export", str(env.copy_adapter()), str(env.tmp / "share")]


CASES = [
    # --- calibrate: sites, data, options ------------------------------------------------------
    case("site-traversal", lambda env: env.calibrate("--site", "../x"), "site", "'../x'"),
    case("site-unknown", lambda env: env.calibrate("--site", "OH"), "unknown site or region 'OH'"),
    case("site-empty", lambda env: env.calibrate("--site", ""), "site"),
    case("data-missing-gpp", lambda env: env.calibrate("--site", "IA", data=env.data(drop("GPP"))),
         "GPP"),
    case("data-nan-input", lambda env: env.calibrate(
        "--site", "IA", data=env.data(setv("RADN", np.nan, n=2))), "RADN", "NaN"),
    case("data-kelvin", lambda env: env.calibrate(
        "--site", "IA", data=env.data(lambda f: f.assign(TMAX_AIR=f["TMAX_AIR"] + 273.15))),
         "TMAX_AIR"),
    case("data-gpp-in-mol", lambda env: env.calibrate(
        "--site", "IA", data=env.data(scale("GPP", 1000.0))), "GPP"),
    # without cross-validation one year leaves none for early stopping (with it: day-block folds)
    case("data-one-year", lambda env: env.calibrate(
        "--site", "IA", "--cv", "none", data=env.data(frame=make_frame(years=(2003,)))),
         "single complete year"),
    case("data-missing-file", lambda env: env.calibrate("--site", "IA", data=env.tmp / "nope.csv"),
         "nope.csv"),
    case("region-label-unsafe", lambda env: env.calibrate(
        "--site", "all", data=env.data(_bad_region)), "region label", "'I/L'"),
    case("out-parent-is-a-file", lambda env: (_touch(env.tmp / "nowhere"),
                                               env.calibrate("--site", "IA", out=env.tmp / "nowhere" / "store"))[1],
         "nowhere is not a folder"),
    case("adapter-exists", _existing_adapter, "exists; pass --force"),
    case("backbone-is-adapter", lambda env: env.calibrate(  # the last --backbone wins
        "--site", "IA", "--backbone", str(env.copy_adapter())), "not a kgml-peft backbone"),
    case("config-unknown-key", _config("learning_rate = 0.1\n"), "unknown calibration config key"),
    case("config-unknown-adapter-key", _config("[adapter]\nrank = 2\n"), "unknown adapter config key"),
    case("config-unparsable", _config("lr = = 1\n"), "cannot parse"),
    case("config-adapter-not-a-table", _config("adapter = 3\n"), "[adapter]", "must be dict"),
    case("all-one-bad-region", lambda env: env.calibrate("--site", "all", "--cv", "none", data=env.data(
        frame=_one_region_one_year())), "IL has a single complete year"),
    case("validation-unobserved", lambda env: env.calibrate("--site", "IA", "--cv", "none", data=env.data(
        frame=_blank_last_year())), "validation years (2005) have no observation"),
    case("seed-negative", lambda env: env.calibrate("--site", "IA", "--seed", "-1"), "seed must be in"),
    case("mu-infinite", lambda env: env.calibrate("--site", "IA", "--mu", "inf"), "mu must be a finite"),
    case("config-wrong-type", _config('rho = "lots"\n'), "rho must be int or float"),
    case("components-unknown", lambda env: env.calibrate("--site", "IA", "--components", "lora,prefix"),
         "unknown adapter component 'prefix'"),
    case("lora-target-unknown", lambda env: env.calibrate("--site", "IA", "--lora-targets", "gru_co2"),
         "unknown LoRA target 'gru_co2'"),
    case("rank-zero", lambda env: env.calibrate("--site", "IA", "--rank", "0"), "lora_rank must be >= 1"),
    case("rank-text", lambda env: env.calibrate("--site", "IA", "--rank", "two"), "--rank"),
    case("epochs-zero", lambda env: env.calibrate("--site", "IA", "--epochs", "0"), "epochs >= 1"),
    case("val-fraction-zero", lambda env: env.calibrate("--site", "IA", "--val-fraction", "0"),
         "val_fraction must be in (0, 1)"),
    case("rho-negative", lambda env: env.calibrate("--site", "IA", "--rho", "-1"), "rho must be a finite number >= 0"),
    case("method-unknown", lambda env: env.calibrate("--site", "IA", "--method", "lora"), "--method"),
    case("unfreeze-nothing", lambda env: env.calibrate("--site", "IA", "--unfreeze", "decoder"),
         "--unfreeze 'decoder' matches no backbone parameter"),
    case("unfreeze-full", lambda env: env.calibrate("--site", "IA", "--method", "full", "--unfreeze",
                                                    "nee_out"), "unfreeze only applies"),
    case("target-unknown", lambda env: env.calibrate("--site", "IA", "--targets", "GPP"),
         "unknown target 'GPP'"),
    case("target-unobserved", lambda env: env.calibrate(
        "--site", "IA", "--targets", "Yield", data=env.data(drop("Yield"))),
         "target Yield has no observations"),
    # --- adapters verify / show: damaged and foreign files ------------------------------------
    case("verify-other-backbone", _verify(lambda env: env.adapter, other=True),
         "was trained on backbone", "use the backbone it was made for"),
    case("verify-truncated", _verify(_truncated_adapter), "not a readable safetensors file"),
    case("verify-text-file", _verify(_text_file), "not a readable safetensors file"),
    case("verify-pickle", _verify(_pickle_payload), "not a readable safetensors file"),
    case("verify-backbone-file", _verify(lambda env: env.backbone), "it is a backbone checkpoint"),
    case("verify-missing", _verify(lambda env: env.tmp / "IA.safetensors"), "does not exist"),
    case("verify-tampered", _verify(lambda env: env.edited_adapter(
        lambda t, m: t["head.shift"].add_(0.5))), "content hash mismatch"),
    case("verify-shape-mismatch", _verify(lambda env: env.edited_adapter(
        lambda t, m: m.update(adapter_config=m["adapter_config"].replace('"bottleneck": 2',
                                                                         '"bottleneck": 3')))),
         "content hash mismatch"),
    case("show-foreign-safetensors", lambda env: ["adapters", "show", str(env.edited_adapter(
        lambda t, m: m.clear()))], "not a kgml-peft adapter"),
    case("show-unsafe-site", lambda env: ["adapters", "show", str(env.edited_adapter(
        lambda t, m: m.update(site="../../etc/passwd")))], "unsafe site"),
    # --- adapters list / export / import ------------------------------------------------------
    case("list-missing-store", lambda env: ["adapters", "list", "--store", str(env.tmp / "none")],
         "does not exist"),
    case("import-other-backbone", lambda env: _import(env, other=True), "was trained on backbone"),
    case("import-missing-store", lambda env: _import(env, "nowhere", make_store=False),
         "does not exist"),
    case("import-existing", _import_existing, "exists; pass --force"),
    case("export-existing", _export_existing, "exists; pass --force"),
    case("export-wrong-suffix", lambda env: ["adapters", "export", str(env.copy_adapter()),
                                             str(env.tmp / "IA.bin")], "must end in .safetensors"),
    case("export-folder-is-a-file", lambda env: (_touch(env.tmp / "share"), ["adapters", "export", str(env.copy_adapter()),
                                                 str(env.tmp / "share") + "/"])[1], "share is not a folder"),
    case("export-onto-itself", lambda env: ["adapters", "export", str(env.copy_adapter()),
                                            str(env.tmp / "IA-001.safetensors")], "is the input"),
    case("export-truncated", lambda env: ["adapters", "export", str(_truncated_adapter(env)),
                                          str(env.tmp / "out.safetensors")], "not a readable"),
]


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.usefixtures("isolated_globals")
def test_user_error_is_one_line(spec: Case, tmp_path: Path, backbone_path: Path, adapter_path: Path,
                                other_backbone_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = spec.setup(AEnv(work, backbone_path, adapter_path, other_backbone_path))
    before = _snapshot(tmp_path)

    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, spec.expect, tmp_path, before)


def test_enough_cases() -> None:
    assert len(CASES) >= 40


def test_real_process_refuses_a_foreign_adapter_in_one_line(adapter_path, other_backbone_path, tmp_path):
    """What a user's terminal shows (warnings included) for an adapter made for another backbone."""
    proc = subprocess.run(
        [sys.executable, "-m", "kgml_peft", "adapters", "verify", str(adapter_path), "--backbone",
         str(other_backbone_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: adapter ")
