"""Every user error the CLI can meet ends as exit code 2 and one ``error: ...`` line on stderr.

Each case writes a broken input (a corrupted copy of a valid ``make_frame()`` table, a damaged
backbone checkpoint, a bad option or config file) into ``tmp_path`` and runs the real command line
through click's test runner. For every case the test checks:

* exit code 2 and no uncaught exception (a crash would exit 1 with a traceback);
* stderr is exactly one line, starting with ``error: `` and naming what the case expects
  (column, site, first date, unit hint ...);
* no ``Traceback`` anywhere in the output;
* no file was created or changed (nothing is half written on failure).
"""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from kgml_peft.cli import cli
from kgml_peft.data.windows import Scalers
from kgml_peft.model.backbone import BackboneConfig
from kgml_peft.store.checkpoint import fingerprint
from tests.conftest import make_frame

# ---------------------------------------------------------------------------------------------
# helpers used by the cases


def _runner() -> CliRunner:
    """A runner that keeps stderr apart (click < 8.2 needs ``mix_stderr=False``, 8.2+ always does)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False, date_format="%Y-%m-%d")
    else:
        frame.to_parquet(path, index=False)
    return path


def _rows(frame: pd.DataFrame, site: str, start: str, n: int = 1) -> pd.Index:
    """Index of ``n`` consecutive rows of ``site`` from date ``start``."""
    first = frame.index[(frame["site"] == site) & (frame["date"] == pd.Timestamp(start))][0]
    return pd.RangeIndex(first, first + n)


class Evil:
    """Unpickling this creates ``marker`` (no os.system needed): proof that a loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


#: The file the pickle payloads create if anything unpickles them; it must never appear.
MARKER = "unpickled.marker"


@dataclass
class Env:
    """What a case's setup gets: a scratch folder (the working directory) and a valid backbone."""

    tmp: Path
    backbone: Path

    def data(self, corrupt: Callable[[pd.DataFrame], pd.DataFrame | None] | None = None,
             name: str = "data.csv", frame: pd.DataFrame | None = None) -> Path:
        """Write a (corrupted) valid table and return its path."""
        table = make_frame() if frame is None else frame
        if corrupt is not None:
            out = corrupt(table)
            table = table if out is None else out
        return _write(table, self.tmp / name)

    def evaluate(self, data: Path, backbone: Path | None = None, *extra: str) -> list[str]:
        return ["evaluate", "--backbone", str(backbone or self.backbone), "--data", str(data), *extra]

    def tampered_backbone(self, edit: Callable[[dict, dict], None], name: str = "bad.safetensors") -> Path:
        """A copy of the valid backbone whose tensors/metadata ``edit`` changed in place."""
        with safe_open(str(self.backbone), framework="pt") as handle:
            metadata = dict(handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        edit(tensors, metadata)
        path = self.tmp / name
        save_file(tensors, str(path), metadata=metadata)
        return path

    def pretrain(self, *extra: str, data: Path | None = None) -> list[str]:
        out_dir = self.tmp / "ckpt"
        out_dir.mkdir(exist_ok=True)
        data = data or self.data()
        return ["pretrain", "--data", str(data), "--out-dir", str(out_dir), "--cpu", "--quiet", *extra]


@dataclass
class Case:
    setup: Callable[[Env], list[str]]
    expect: tuple[str, ...]
    #: Files that must not exist afterwards (relative to tmp), beyond the no-new-files check.
    absent: tuple[str, ...] = field(default=())


def case(id: str, setup: Callable[[Env], list[str]], *expect: str, absent: tuple[str, ...] = ()):
    return pytest.param(Case(setup, expect, absent), id=id)


# --- data corruptions ------------------------------------------------------------------------


def drop(column: str):
    return lambda f: f.drop(columns=[column])


def setv(column: str, value, site: str = "IA-001", start: str = "2003-07-14", n: int = 1):
    def corrupt(f: pd.DataFrame) -> pd.DataFrame:
        if isinstance(value, str):  # a text cell in a numeric column
            f[column] = f[column].astype(object)
        f.loc[_rows(f, site, start, n), column] = value
        return f
    return corrupt


def scale(column: str, factor: float):
    def corrupt(f: pd.DataFrame) -> None:
        f[column] = f[column] * factor
    return corrupt


def rename(old: str, new: str):
    return lambda f: f.rename(columns={old: new})


def rename_site(old: str, new: str):
    def corrupt(f: pd.DataFrame) -> None:
        f["site"] = f["site"].replace(old, new)
    return corrupt


def duplicate_row(f: pd.DataFrame) -> pd.DataFrame:
    row = f.loc[_rows(f, "IL-001", "2004-03-05")]
    return pd.concat([f, row], ignore_index=True)


def two_regions(f: pd.DataFrame) -> None:
    f.loc[_rows(f, "IL-001", "2004-06-01", 10), "region"] = "IN"


def short_site(f: pd.DataFrame) -> pd.DataFrame:
    keep = (f["site"] == "IA-001") | (f["date"] < pd.Timestamp("2003-04-11"))
    return f[keep]


def no_complete_year(f: pd.DataFrame) -> pd.DataFrame:
    # IL-001 keeps 2003-07-01 .. 2004-06-30: 366 rows, but no whole calendar year.
    in_span = (f["date"] >= pd.Timestamp("2003-07-01")) & (f["date"] <= pd.Timestamp("2004-06-30"))
    return f[(f["site"] == "IA-001") | in_span]


def bad_date(f: pd.DataFrame) -> None:
    row = _rows(f, "IL-001", "2003-02-10")
    f["date"] = f["date"].dt.strftime("%Y-%m-%d")
    f.loc[row, "date"] = "2003-02-31"


def day_month_dates(f: pd.DataFrame) -> pd.DataFrame:
    f["date"] = f["date"].dt.strftime("%d/%m/%Y")  # ambiguous day/month order: refused
    return f


def fractional_numeric_date(f: pd.DataFrame) -> pd.DataFrame:
    f["date"] = f["date"].dt.strftime("%Y%m%d").astype(float)
    f.loc[3, "date"] = 20030104.5
    return f


def blank_region(f: pd.DataFrame) -> None:
    f.loc[f["site"] == "IL-001", "region"] = "   "


def existing_checkpoint(env: Env) -> list[str]:
    (env.tmp / "ckpt").mkdir(exist_ok=True)
    (env.tmp / "ckpt" / "demo.safetensors").write_bytes(b"a good checkpoint")
    return env.pretrain()


def observed_without_nee(env: Env) -> list[str]:
    observed = env.data(lambda f: f.drop(columns=["NEE", "Reco"]), name="obs.csv")
    config = env.tmp / "config.toml"
    config.write_text(tiny("") + '[[phases]]\nname = "obs"\ndata = "observed"\n'
                      'targets = { NEE = 1.0, Reco = 1.0 }\nepochs = 1\n')
    return env.pretrain("--observed", str(observed), "--config", str(config))


# --- setups ----------------------------------------------------------------------------------


def data_case(corrupt, name: str = "data.csv", *extra: str) -> Callable[[Env], list[str]]:
    return lambda env: env.evaluate(env.data(corrupt, name), None, *extra)


def raw_file(name: str, content: bytes) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / name
        path.write_bytes(content)
        return env.evaluate(path)
    return setup


def header_only(env: Env) -> list[str]:
    path = env.tmp / "header.csv"
    path.write_text(",".join(make_frame().columns) + "\n")
    return env.evaluate(path)


def data_dir(env: Env) -> list[str]:
    (env.tmp / "tables").mkdir()
    return env.evaluate(env.tmp / "tables")


def data_dir_csv(env: Env) -> list[str]:
    (env.tmp / "tables.csv").mkdir()
    return env.evaluate(env.tmp / "tables.csv")


def not_utf8(env: Env) -> list[str]:
    path = env.data()
    path.write_bytes(path.read_bytes().replace(b"IL-001", b"IL-\xff\xfe1"))
    return env.evaluate(path)


def backbone_case(make: Callable[[Env], Path]) -> Callable[[Env], list[str]]:
    return lambda env: env.evaluate(env.data(), make(env))


def backbone_dir(env: Env) -> Path:
    path = env.tmp / "bb.safetensors"
    path.mkdir()
    return path


def torch_pickle(env: Env) -> Path:
    path = env.tmp / "model.pt"
    torch.save({"a": torch.zeros(2)}, path)
    return path


def torch_pickle_payload(env: Env) -> Path:
    path = env.tmp / "payload.safetensors"
    torch.save({"state_dict": {"a": torch.zeros(2)}, "hook": Evil(env.tmp / MARKER)}, path)
    return path


def raw_pickle_payload(env: Env) -> Path:
    path = env.tmp / "payload.pkl"
    path.write_bytes(pickle.dumps(Evil(env.tmp / MARKER)))
    return path


def truncated(env: Env) -> Path:
    raw = env.backbone.read_bytes()
    path = env.tmp / "truncated.safetensors"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def header_only_backbone(env: Env) -> Path:
    raw = env.backbone.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    path = env.tmp / "header.safetensors"
    path.write_bytes(raw[: 8 + size])
    return path


def foreign(metadata: dict | None) -> Callable[[Env], Path]:
    def make(env: Env) -> Path:
        path = env.tmp / "foreign.safetensors"
        save_file({"weight": torch.zeros(3, 2)}, str(path), metadata=metadata)
        return path
    return make


def tamper(edit: Callable[[dict, dict], None]) -> Callable[[Env], Path]:
    return lambda env: env.tampered_backbone(edit)


def _bump(tensors: dict, metadata: dict) -> None:
    tensors["gru_ra.bias_hh_l0"] = tensors["gru_ra.bias_hh_l0"] + 1e-3


def _nan(tensors: dict, metadata: dict) -> None:
    tensors["nee_out.bias"] = torch.full_like(tensors["nee_out.bias"], float("nan"))


def _float64(tensors: dict, metadata: dict) -> None:
    tensors["nee_out.bias"] = tensors["nee_out.bias"].double()


def _extra_tensor(tensors: dict, metadata: dict) -> None:
    tensors["lora.A"] = torch.zeros(2, 2)


def _missing_tensor(tensors: dict, metadata: dict) -> None:
    del tensors["gru_rh.weight_hh_l1"]


def _scalers_edited(tensors: dict, metadata: dict) -> None:
    scalers = json.loads(metadata["scalers"])
    scalers["mean"]["GPP"] += 1.0
    metadata["scalers"] = json.dumps(scalers, sort_keys=True)


def _config_broken(tensors: dict, metadata: dict) -> None:
    metadata["config"] = metadata["config"][:-5]


def _format_version(tensors: dict, metadata: dict) -> None:
    metadata["format_version"] = "99"


def _scalers_wrong_shape(tensors: dict, metadata: dict) -> None:
    metadata["scalers"] = json.dumps({"mean": 1, "std": 2})


def _rescale(edit: Callable[[dict], None]) -> Callable[[dict, dict], None]:
    """Edit the scalers and re-sign the file, as a buggy writer would: the fingerprint matches."""
    def change(tensors: dict, metadata: dict) -> None:
        scalers = json.loads(metadata["scalers"])
        edit(scalers)
        metadata["scalers"] = json.dumps(scalers, sort_keys=True)
        config = BackboneConfig.from_dict(json.loads(metadata["config"]))
        metadata["fingerprint"] = fingerprint(tensors, config, Scalers.from_dict(scalers))
    return change


def _drop_radn_scaler(scalers: dict) -> None:
    del scalers["mean"]["RADN"], scalers["std"]["RADN"]


def _zero_std(scalers: dict) -> None:
    scalers["std"]["WIND"] = 0.0


def tiny(top: str) -> str:
    """A tiny config with ``top`` as its top-level keys (they must come before any table):
    should a bad value slip past the checks, training still stops within a second."""
    return top + '[backbone]\nhidden_size = 4\nattention_size = 2\nyield_hidden = 2\n' \
        '[[phases]]\nname = "a"\nepochs = 1\n'


def write_bytes_config(content: bytes) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "config.toml"
        path.write_bytes(content)
        return env.pretrain("--config", str(path))
    return setup


def synth_case(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: ["synth", *args]


def write_config(text: str, name: str = "config.toml") -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / name
        path.write_text(text)
        return env.pretrain("--config", str(path))
    return setup


# ---------------------------------------------------------------------------------------------
# the cases

CASES = [
    # --- identifier columns and features missing or misspelt
    case("missing-site", data_case(drop("site")), "missing column site"),
    case("missing-region", data_case(drop("region")), "missing column region"),
    case("missing-date", data_case(drop("date")), "missing column date"),
    case("missing-feature", data_case(drop("TSOC")), "missing column TSOC", "input of the backbone"),
    case("misspelt-feature", data_case(rename("TMAX_AIR", "TMAX_Air")),
         "missing column TMAX_AIR", "did you mean to rename 'TMAX_Air'"),
    case("misspelt-site", data_case(rename("site", "Site")), "missing column site", "'Site'"),
    case("semicolon-csv", raw_file("semi.csv", b"site;region;date;RADN\nIA-001;IA;2003-01-01;5\n"),
         "missing column site"),
    # --- bad input values
    case("nan-input", data_case(setv("TMAX_AIR", np.nan, n=3)),
         "column TMAX_AIR has 3 NaN values (site IA-001, first 2003-07-14)"),
    case("nan-input-parquet", data_case(setv("GPP", np.nan, "IL-001", "2004-02-29"), "data.parquet"),
         "column GPP has 1 NaN values", "site IL-001", "2004-02-29"),
    case("inf-input-csv", data_case(setv("WIND", np.inf, "IL-001", "2003-05-02")),
         "column WIND has 1 infinite values", "site IL-001", "2003-05-02"),
    case("inf-input-parquet", data_case(setv("PRECN", -np.inf, "IA-001", "2004-12-31"), "data.parquet"),
         "column PRECN has 1 infinite values", "site IA-001", "2004-12-31"),
    case("non-numeric-input", data_case(setv("TMAX_AIR", "warm", "IL-001", "2003-08-01", 2)),
         "column TMAX_AIR is not numeric", "'warm'", "site IL-001", "2003-08-01"),
    case("radiation-in-w-m2", data_case(scale("RADN", 1 / 0.0864)),
         "column RADN", "outside [0, 45] MJ m-2 d-1", "site IA-001", "W m-2"),
    case("negative-precipitation", data_case(setv("PRECN", -1.5, "IL-001", "2003-06-30")),
         "column PRECN has 1 values outside [0, 500]", "-1.5", "site IL-001", "2003-06-30"),
    case("temperature-in-kelvin", data_case(lambda f: f.assign(TMAX_AIR=f["TMAX_AIR"] + 273.15)),
         "column TMAX_AIR", "site IA-001", "2003-01-01", "Kelvin"),
    case("soc-in-percent", data_case(lambda f: f.assign(TSOC=f["TSOC"].where(f["site"] == "IA-001", 2500.0))),
         "column TSOC", "site IL-001", "percent instead of g kg-1"),
    # (Humidity given as a fraction, 0-1, is inside the accepted 0-100 % range and cannot be told
    # apart from a very dry day, so it is not an error and has no case here.)
    # --- targets: NaN is fine (masked), inf and out-of-range are not
    case("target-inf", data_case(setv("NEE", np.inf, "IL-001", "2004-04-04"), "data.parquet"),
         "column NEE has 1 infinite values", "site IL-001", "2004-04-04"),
    case("target-umol", data_case(lambda f: f.assign(Reco=f["Reco"] * 100)),
         "column Reco", "outside [-10, 80]", "umol m-2 s-1"),
    case("target-negative-yield", data_case(setv("Yield", -1.0, "IA-001", "2004-10-01")),
         "column Yield", "outside [0, 30]", "site IA-001", "2004-10-01"),
    # --- dates and rows
    case("day-month-dates", data_case(day_month_dates), "column date", "use YYYY-MM-DD or YYYYMMDD"),
    case("fractional-numeric-date", data_case(fractional_numeric_date), "'20030104.5'", "site IA-001"),
    case("blank-region", data_case(blank_region), "column region has empty values"),
    case("group-option-threads-zero", lambda env: ["--threads", "0", "demo"],
         "kgml-peft: Invalid value for '--threads'"),
    case("pretrain-existing-checkpoint", existing_checkpoint, "exists; pass --force"),
    case("pretrain-observed-without-targets", observed_without_nee,
         "phase obs: the observed data has no values for NEE, Reco"),
    case("bad-date-string", data_case(bad_date), "column date", "not dates", "'2003-02-31'", "site IL-001"),
    case("duplicate-site-date", data_case(duplicate_row),
         "1 duplicate site-dates (site IL-001, first 2004-03-05)"),
    case("site-in-two-regions", data_case(two_regions), "site IL-001 has more than one region"),
    case("empty-region", data_case(setv("region", np.nan, "IA-001", "2003-03-03", 4)),
         "column region has 4 empty values"),
    case("empty-site", data_case(setv("site", np.nan, "IA-001", "2003-03-03")),
         "column site has 1 empty values"),
    # --- unsafe site ids (they become file names)
    case("site-dotdot", data_case(rename_site("IA-001", "../x")), "unsafe site id '../x'"),
    case("site-absolute", data_case(rename_site("IA-001", "/abs")), "unsafe site id '/abs'"),
    case("site-newline", data_case(rename_site("IL-001", "IL\n001")), "unsafe site id 'IL\\n001'"),
    case("site-nul-parquet", data_case(rename_site("IL-001", "IL\x00001"), "data.parquet"),
         "unsafe site id 'IL\\x00001'"),
    case("site-too-long", data_case(rename_site("IA-001", "S" * 65)), "unsafe site id 'SSS"),
    # --- too little data
    case("site-under-365-days", data_case(short_site), "site IL-001 has only 100 days", "365"),
    case("site-no-calendar-year", data_case(no_complete_year),
         "site IL-001 has no complete calendar year", "29 February"),
    # --- the file itself
    case("csv-empty-file", raw_file("empty.csv", b""), "empty.csv is empty"),
    case("csv-header-only", header_only, "header.csv has no rows"),
    case("csv-not-utf8", not_utf8, "cannot read", "data.csv as csv"),
    case("unknown-extension", data_case(None, "data.txt"), "unknown table format '.txt'", ".csv or .parquet"),
    case("data-is-directory", data_dir, "tables is a directory"),
    case("data-is-directory-csv", data_dir_csv, "tables.csv is a directory"),
    case("data-missing", lambda env: env.evaluate(env.tmp / "nowhere.parquet"),
         "data file", "nowhere.parquet does not exist"),
    case("parquet-corrupt", raw_file("corrupt.parquet", np.random.default_rng(1).bytes(4096)),
         "cannot read", "corrupt.parquet as parquet"),
    case("parquet-truncated", lambda env: env.evaluate(_truncate(env.data(None, "cut.parquet"))),
         "cannot read", "cut.parquet as parquet"),
    # --- options of evaluate
    case("unknown-site-selector", data_case(None, "data.csv", "--site", "IA-999"),
         "unknown site or region 'IA-999'", "regions IA, IL"),
    case("unknown-region-selector", data_case(None, "data.parquet", "--site", "NE"),
         "unknown site or region 'NE'"),
    # --- backbone files
    case("backbone-missing", backbone_case(lambda env: env.tmp / "none.safetensors"),
         "backbone", "none.safetensors does not exist"),
    case("backbone-directory", backbone_case(backbone_dir), "bb.safetensors is a directory"),
    case("backbone-torch-pickle", backbone_case(torch_pickle),
         "model.pt is not a readable safetensors file"),
    case("backbone-torch-pickle-payload", backbone_case(torch_pickle_payload),
         "payload.safetensors is not a readable safetensors file", absent=(MARKER,)),
    case("backbone-raw-pickle-payload", backbone_case(raw_pickle_payload),
         "payload.pkl is not a readable safetensors file", absent=(MARKER,)),
    case("backbone-truncated", backbone_case(truncated), "truncated.safetensors is not a readable safetensors"),
    case("backbone-header-only", backbone_case(header_only_backbone),
         "header.safetensors is not a readable safetensors"),
    case("backbone-empty-file", backbone_case(lambda env: _touch(env.tmp / "empty.safetensors")),
         "empty.safetensors is not a readable safetensors"),
    case("backbone-foreign-no-metadata", backbone_case(foreign(None)),
         "foreign.safetensors is not a kgml-peft backbone (format None)"),
    case("backbone-foreign-metadata", backbone_case(foreign({"format": "pt"})),
         "foreign.safetensors is not a kgml-peft backbone (format 'pt')"),
    case("backbone-format-version", backbone_case(tamper(_format_version)),
         "backbone format version '99'"),
    case("backbone-config-unreadable", backbone_case(tamper(_config_broken)), "unreadable metadata"),
    case("backbone-scalers-not-a-dict", backbone_case(tamper(_scalers_wrong_shape)), "unreadable metadata"),
    case("backbone-scaler-missing", backbone_case(tamper(_rescale(_drop_radn_scaler))),
         "bad.safetensors has no scaler for RADN"),
    case("backbone-scaler-zero-std", backbone_case(tamper(_rescale(_zero_std))),
         "bad.safetensors has a bad scaler for WIND", "std 0"),
    case("backbone-tensor-modified", backbone_case(tamper(_bump)), "fingerprint mismatch", "modified or is corrupt"),
    case("backbone-scalers-modified", backbone_case(tamper(_scalers_edited)), "fingerprint mismatch"),
    case("backbone-tensor-nan", backbone_case(tamper(_nan)), "tensor nee_out.bias contains NaN or inf"),
    case("backbone-tensor-float64", backbone_case(tamper(_float64)),
         "tensor nee_out.bias is torch.float64, expected float32"),
    case("backbone-extra-tensor", backbone_case(tamper(_extra_tensor)), "does not match its config", "lora.A"),
    case("backbone-missing-tensor", backbone_case(tamper(_missing_tensor)),
         "does not match its config", "missing gru_rh.weight_hh_l1"),
    # --- synth options
    case("synth-unknown-extension", synth_case("--out", "demo.txt"), "unknown table format '.txt'"),
    case("synth-folder-is-a-file", lambda env: (_touch(env.tmp / "nowhere"), ["synth", "--out", "nowhere/demo.csv"])[1],
         "output folder nowhere is not a folder"),
    # --- click's own option errors, also one line
    case("evaluate-bad-choice", lambda env: env.evaluate(env.data(), None, "--by", "foo"),
         "kgml-peft evaluate:", "'foo' is not one of"),
    case("evaluate-missing-data", lambda env: ["evaluate", "--backbone", str(env.backbone)],
         "Missing option '--data'"),
    case("pretrain-bad-mixed-precision", lambda env: env.pretrain("--mixed-precision", "fp8"),
         "'fp8' is not one of"),
    case("synth-out-is-directory", lambda env: ["synth", "--out", str(env.tmp)], "is a directory"),
    case("backbone-show-unknown-option", lambda env: ["backbone", "show", str(env.backbone), "--nope"],
         "kgml-peft backbone show: No such option '--nope'"),
    # --- pretrain options and config: all fail before training
    case("pretrain-unsafe-name", lambda env: env.pretrain("--name", "../evil"), "unsafe checkpoint name '../evil'",
         absent=("evil.safetensors",)),
    case("pretrain-out-dir-is-a-file", lambda env: (_touch(env.tmp / "no"), env.pretrain("--out-dir", str(env.tmp / "no" / "dir")))[1],
         "output folder", "is not a folder"),
    case("pretrain-config-missing", lambda env: env.pretrain("--config", "missing.toml"),
         "config file missing.toml does not exist"),
    case("pretrain-config-unknown-key", write_config("seed = 1\nlearning_rate = 0.1\n"),
         "unknown pretraining config key 'learning_rate'"),
    case("pretrain-config-unknown-backbone-key", write_config("[backbone]\nhiden_size = 8\n"),
         "unknown backbone config key 'hiden_size'"),
    case("pretrain-config-unknown-feature", write_config('[backbone]\nfeatures = ["GPP", "SUN"]\n'),
         "unknown feature 'SUN'"),
    case("pretrain-config-bad-phase", write_config('[[phases]]\nname = "x"\nwings = 2\n'), "bad phase in config"),
    case("pretrain-config-mixed-precision", write_config('mixed_precision = "fp8"\n'),
         "mixed_precision must be no, fp16 or bf16"),
    case("pretrain-config-wrong-type", write_config('[backbone]\nhidden_size = "big"\n'),
         "hidden_size must be int, got 'big'"),
    case("pretrain-config-backbone-not-table", write_config("backbone = 3\n"), "bad value in config"),
    case("pretrain-config-weight-not-number", write_config('[[phases]]\nname = "a"\ntargets = { Ra = "x" }\n'),
         "phase a: target weight must be int or float, got 'x'"),
    case("pretrain-config-val-fraction-text", write_config(tiny('val_fraction = "x"\n')),
         "val_fraction must be int or float, got 'x'"),
    case("pretrain-config-val-fraction-one", write_config(tiny("val_fraction = 1.0\n")),
         "val_fraction must be in [0, 1), got 1.0"),
    case("pretrain-config-seed-text", write_config(tiny('seed = "abc"\n')), "seed must be int, got 'abc'"),
    case("pretrain-config-tolerance-text", write_config(tiny('tolerance = "x"\n')),
         "tolerance must be int or float, got 'x'"),
    case("pretrain-config-not-utf8", write_bytes_config(b"seed = \xff\n"), "cannot parse", "config.toml"),
    case("pretrain-config-not-toml", write_config("seed = = 1\n[backbone\n"), "cannot parse", "config.toml"),
    case("pretrain-data-missing-target",
         lambda env: env.pretrain(data=env.data(drop("Yield"), "synthetic.parquet")),
         "missing column Yield", "a target this command needs"),
    case("pretrain-data-nan-input",
         lambda env: env.pretrain(data=env.data(setv("TDIF_AIR", np.nan, "IL-001", "2004-01-02"))),
         "column TDIF_AIR has 1 NaN values (site IL-001, first 2004-01-02)"),
]


def _touch(path: Path) -> Path:
    path.touch()
    return path


def _truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.usefixtures("isolated_globals")
def test_user_error_is_one_line(spec: Case, tmp_path: Path, backbone_path: Path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = spec.setup(Env(work, backbone_path))
    before = _snapshot(tmp_path)

    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, spec.expect, tmp_path, before)
    for name in spec.absent:
        assert not (work / name).exists() and not (tmp_path / name).exists(), name


def check_user_error(result, args: list[str], expect: tuple[str, ...], root: Path,
                     before: dict[str, bytes | None]) -> None:
    """Exit code 2, exactly one ``error:`` line on stderr naming every word of ``expect``, nothing
    on stdout, no traceback, and no file under ``root`` created or changed since ``before``."""
    detail = f"args={args}\nstdout={result.stdout!r}\nstderr={result.stderr!r}\nexception={result.exception!r}"
    assert not (result.exception and not isinstance(result.exception, SystemExit)), detail
    assert result.exit_code == 2, detail
    assert "Traceback" not in result.output and "Traceback" not in result.stderr, detail
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), detail
    assert lines[0].startswith("error: "), detail
    for word in expect:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}\n{detail}"
    assert result.stdout == "", detail
    assert _snapshot(root) == before, "the command created or changed files"
    assert not (root / MARKER).exists() and not (root / "work" / MARKER).exists()


def test_real_process_prints_one_line(tmp_path: Path, backbone_path: Path) -> None:
    """The same through a real interpreter: what a user's terminal shows, warnings included."""
    data = Env(tmp_path, backbone_path).data(setv("TMAX_AIR", np.nan, n=3))
    proc = subprocess.run(
        [sys.executable, "-m", "kgml_peft", "evaluate", "--backbone", str(backbone_path), "--data", str(data)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == "error: column TMAX_AIR has 3 NaN values (site IA-001, first 2003-07-14)\n"


def test_pickle_payload_is_live(tmp_path: Path) -> None:
    """The payload used above really creates its marker when unpickled, so its absence means something."""
    marker = tmp_path / "control.marker"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


def test_enough_cases() -> None:
    assert len(CASES) >= 35
