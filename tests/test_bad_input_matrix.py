"""One table of bad input across every command that reads files from users: ``synth``,
``pretrain``, ``evaluate``, ``predict``, ``calibrate``, ``adapters list|show|verify|import|export``,
``import fluxnet`` and ``backbone show``, through the real command line (click's test runner).

Each row is ``(id, setup, expected words)``: the setup writes the broken input into the case's
scratch folder and returns the command line. Every input the command reads (backbones, adapters,
tables) is copied into that folder first, so the one check below covers them too. For every row:
exit code 2; one ``error: ...`` line naming the problem and nothing else on stdout or stderr; no
traceback; no file created anywhere in the scratch folder; every file that was there before is
byte for byte the same and keeps its modification time; and no pickle payload ran.

The harness (``check_user_error``, ``Env``/``AEnv``, the table corruptions and pickle payloads)
is the one of ``test_cli_validation.py`` and ``test_cli_adapter_validation.py``; this file adds
the cross-command matrix, modification times, the adapter/backbone copies and FLUXNET files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from kgml_peft.tuners.config import AdapterConfig
from kgml_peft.cli import cli
from kgml_peft.store.adapter import _hash, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import random_adapter
from tests.test_cli_adapter_validation import AEnv, _existing_adapter
from tests.test_cli_validation import (
    MARKER,
    Case,
    _runner,
    _snapshot,
    _touch,
    case,
    check_user_error,
    drop,
    duplicate_row,
    existing_checkpoint,
    rename,
    rename_site,
    scale,
    setv,
    short_site,
    torch_pickle,
    torch_pickle_payload,
)
from tests.test_fluxnet_import import DAILY, EDIT_SITE, CsvText

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "demo.safetensors"


@dataclass
class MEnv(AEnv):
    """The adapter harness's environment (``tmp``, ``backbone``, ``adapter``, ``other``, all of
    them copies inside the case's folder), a valid adapter made for ``other`` and helpers for the
    commands the harness lacks."""

    other_adapter: Path = Path()

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path

    def store(self, adapter: Path | None = None, name: str = "IA-001.safetensors") -> Path:
        """An adapter store holding ``adapter`` (default: the valid one) as ``name``."""
        store = self.folder("store")
        shutil.copyfile(adapter or self.adapter, store / name)
        return store

    def predict(self, *extra: str, data: Path | None = None, out: str = "pred.csv",
                store: Path | None = None) -> list[str]:
        return ["predict", "--data", str(data or self.data()), "--backbone", str(self.backbone),
                "--out", out, "--adapters", str(store or self.store()), "--quiet", "--cpu", *extra]

    def verify(self, adapter: Path, backbone: Path | None = None) -> list[str]:
        return ["adapters", "verify", str(adapter), "--backbone", str(backbone or self.backbone)]

    def shipped(self) -> Path:
        """A copy of the shipped demo backbone (it has training curves to plot)."""
        path = self.folder("inputs") / "demo.safetensors"
        shutil.copyfile(SHIPPED, path)
        return path

    def fluxnet(self, edit: Callable[[CsvText], CsvText | None] | None = None, rows: int = 400) -> Path:
        """A short copy (first ``rows`` days) of a real FLUXNET2015 daily file, edited."""
        if not DAILY.is_dir():
            pytest.skip(f"real FLUXNET2015 data not found at {DAILY}")
        text = CsvText(EDIT_SITE)
        del text.rows[rows:]
        if edit is not None:
            text = edit(text) or text
        return text.write(self.tmp / "towers")

    def import_fluxnet(self, *extra: str, path: Path | None = None, out: str = "flux.parquet") -> list[str]:
        return ["import", "fluxnet", str(path or self.fluxnet()), "--out", out, *extra]


def _in_the_way(env: MEnv, args: list[str]) -> list[str]:
    """``args`` with a regular file ``nowhere`` where the output's folder would be created."""
    (env.tmp / "nowhere").write_text("a file, not a folder\n")
    return args


# --- inputs that are not what they claim ---------------------------------------------------


def _evil_pt(env: MEnv) -> Path:
    """A ``.pt`` (``torch.save``) whose pickle would create the marker file if anything unpickled it."""
    return torch_pickle_payload(env).rename(env.tmp / "evil.pt")


def _truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    raw = source.read_bytes()
    target.write_bytes(raw[: int(len(raw) * keep)])
    return target


def _dir(env: MEnv, name: str) -> Path:
    path = env.tmp / name
    path.mkdir()
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _read_only(env: MEnv) -> Path:
    """A folder nobody but root may write to (root may: such a case is skipped)."""
    if os.geteuid() == 0:
        pytest.skip("root can write into a 0o555 folder")
    folder = env.folder("readonly")
    folder.chmod(0o555)
    return folder


# --- adapter files that lie ----------------------------------------------------------------


def _resigned(edit: Callable[[dict, dict], None]) -> Callable[[dict, dict], None]:
    """Edit an adapter's tensors/metadata, then fix ``parameters`` and ``content_hash`` as a buggy
    writer would: the file passes the integrity checks and must be caught against the backbone."""
    def change(tensors: dict, metadata: dict) -> None:
        edit(tensors, metadata)
        config = AdapterConfig.from_dict(json.loads(metadata["adapter_config"]))
        metadata["parameters"] = str(sum(t.numel() for t in tensors.values()))
        metadata["content_hash"] = _hash(metadata["site"], config, metadata["backbone_fingerprint"],
                                         json.loads(metadata["features"]), tensors)
    return change


def _rank_2(tensors: dict, metadata: dict) -> None:
    config = json.loads(metadata["adapter_config"])
    assert config["lora_rank"] == 1
    metadata["adapter_config"] = json.dumps({**config, "lora_rank": 2}, sort_keys=True)


def _extra_tensor(tensors: dict, metadata: dict) -> None:
    tensors["lora.extra.weight"] = torch.zeros(2, 2)


def _missing_tensor(tensors: dict, metadata: dict) -> None:
    del tensors[sorted(k for k in tensors if k.startswith("blocks."))[0]]


def _rank_huge(tensors: dict, metadata: dict) -> None:
    """A rank whose LoRA factors would take terabytes: it must be refused, not allocated."""
    metadata["adapter_config"] = json.dumps({**json.loads(metadata["adapter_config"]), "lora_rank": 10**11},
                                            sort_keys=True)


def _deep_json(key: str) -> Callable[[dict, dict], None]:
    """JSON metadata nested deeper than Python's parser recurses."""
    return lambda tensors, metadata: metadata.update({key: "[" * 100_000})


def _backbone_metadata(key: str, value: Callable[[str], str]) -> Callable[[MEnv], Path]:
    """A copy of the tiny backbone whose metadata ``key`` is ``value(old)`` (not re-signed: the
    training summary is not fingerprinted, and the other edits must be caught before the
    fingerprint is compared)."""
    return lambda env: env.tampered_backbone(lambda tensors, metadata: metadata.update(
        {key: value(metadata[key])}))


def _hidden_size(old: str) -> str:
    return json.dumps({**json.loads(old), "hidden_size": 10**6})


def _in_store(edit: Callable[[dict, dict], None]) -> Callable[[MEnv], Path]:
    """A store whose ``IA-001.safetensors`` is the edited adapter."""
    return lambda env: env.store(env.edited_adapter(edit))


# --- site coordinates ------------------------------------------------------------------------


def _coordinates(*edits: Callable) -> Callable:
    """Add constant ``lat``/``lon`` per site (not features of the backbone), then apply ``edits``
    (table corruptions such as ``setv``)."""
    def corrupt(f):
        f["lat"] = f["site"].map({"IA-001": 41.99, "IL-001": 40.10})
        f["lon"] = f["site"].map({"IA-001": -93.69, "IL-001": -88.29})
        for edit in edits:
            f = edit(f)
        return f
    return corrupt


# --- FLUXNET edits -------------------------------------------------------------------------

FIRST_DAY = "2011-01-05"  # a day inside the first 400 rows of the US-CRT file


def _flux_set(column: str, value: str, n: int = 1) -> Callable[[CsvText], CsvText]:
    return lambda text: text.set(FIRST_DAY, column, value, n)


def _flux_rename(old: str, new: str) -> Callable[[CsvText], None]:
    def edit(text: CsvText) -> None:
        text.header[text.header.index(old)] = new
    return edit


def _flux_duplicate_day(text: CsvText) -> None:
    row = text.index(FIRST_DAY)
    text.rows.insert(row, list(text.rows[row]))


def _flux_empty(env: MEnv) -> list[str]:
    path = env.fluxnet()
    path.write_bytes(b"")
    return env.import_fluxnet(path=path)


def _flux_unsafe_meta(env: MEnv) -> list[str]:
    meta = env.tmp / "meta.csv"
    meta.write_text(f"site,region\n{EDIT_SITE},NE\n../x,NE\n")
    return env.import_fluxnet("--site-meta", str(meta))


def _flux_table(option: str, text: str) -> Callable[[MEnv], list[str]]:
    """Import with ``option`` (``--site-meta`` or ``--crops``) naming a table whose CSV is ``text``."""
    def setup(env: MEnv) -> list[str]:
        path = _text(env.tmp / "table.csv", text)
        return env.import_fluxnet(option, str(path))
    return setup


CASES = [
    # --- synth: the output path -----------------------------------------------------------
    case("synth-out-folder-is-a-file", lambda env: _in_the_way(env, ["synth", "--out", "nowhere/demo.csv"]),
         "output folder nowhere is not a folder"),
    case("synth-out-is-directory", lambda env: ["synth", "--out", str(_dir(env, "demo.csv"))],
         "'--out'", "demo.csv' is a directory"),
    case("synth-out-folder-unwritable",
         lambda env: ["synth", "--out", str(_read_only(env) / "demo.csv")], "is not writable"),
    # --- pretrain: data, output checked before any training --------------------------------
    case("pretrain-text-in-numeric-column",
         lambda env: env.pretrain(data=env.data(setv("TMAX_AIR", "warm", "IL-001", "2003-08-01", 2))),
         "column TMAX_AIR is not numeric", "'warm'", "site IL-001", "2003-08-01"),
    case("pretrain-site-shorter-than-a-year", lambda env: env.pretrain(data=env.data(short_site)),
         "site IL-001 has only 100 days", "365"),
    case("pretrain-data-is-directory", lambda env: env.pretrain(data=_dir(env, "tables.csv")),
         "tables.csv is a directory"),
    case("pretrain-existing-checkpoint", existing_checkpoint, "exists; pass --force"),
    case("pretrain-out-dir-is-a-file",
         lambda env: _in_the_way(env, ["pretrain", "--data", str(env.data()), "--out-dir", "nowhere/x", "--quiet"]),
         "output folder nowhere is not a folder"),
    case("pretrain-name-with-nul", lambda env: env.pretrain("--name", "de\x00mo"),
         "unsafe checkpoint name 'de\\x00mo'"),
    # --- evaluate ------------------------------------------------------------------------
    case("evaluate-radiation-out-of-range",
         lambda env: env.evaluate(env.data(scale("RADN", 1 / 0.0864))),
         "column RADN", "outside [0, 45] MJ m-2 d-1", "W m-2"),
    case("evaluate-empty-file", lambda env: env.evaluate(_touch(env.tmp / "empty.csv")),
         "empty.csv is empty"),
    case("evaluate-unknown-site", lambda env: env.evaluate(env.data(), None, "--site", "IA-999"),
         "unknown site or region 'IA-999'"),
    case("evaluate-site-with-newline", lambda env: env.evaluate(env.data(rename_site("IL-001", "IL\n001"))),
         "unsafe site id 'IL\\n001'"),
    case("evaluate-coordinates-change-within-site",
         lambda env: env.evaluate(env.data(_coordinates(setv("lon", -88.5, "IL-001", "2004-06-01", 10)))),
         "column lon changes within site IL-001", "-88.29 on 2003-01-01", "-88.5 on 2004-06-01"),
    case("evaluate-latitude-out-of-range",
         lambda env: env.evaluate(env.data(_coordinates(setv("lat", 95.0, "IA-001", "2003-01-01", 731)))),
         "column lat", "outside [-90, 90] degrees north", "e.g. 95", "site IA-001"),
    case("evaluate-backbone-torch-state-dict", lambda env: env.evaluate(env.data(), torch_pickle(env)),
         "model.pt is not a readable safetensors file"),
    case("evaluate-backbone-pickle-payload", lambda env: env.evaluate(env.data(), torch_pickle_payload(env)),
         "payload.safetensors is not a readable safetensors file"),
    # --- predict -------------------------------------------------------------------------
    case("predict-missing-column", lambda env: env.predict(data=env.data(drop("GPP"))),
         "missing column GPP", "input of the backbone"),
    case("predict-nan-input", lambda env: env.predict(data=env.data(setv("TMAX_AIR", np.nan, n=3))),
         "column TMAX_AIR has 3 NaN values (site IA-001, first 2003-07-14)"),
    case("predict-humidity-out-of-range",
         lambda env: env.predict(data=env.data(setv("HMAX_AIR", 150.0, "IL-001", "2004-05-06"))),
         "column HMAX_AIR has 1 values outside [0, 100] %", "site IL-001", "2004-05-06"),
    case("predict-site-absolute-path",
         lambda env: env.predict("--site-column", "site", data=env.data(rename_site("IA-001", "/abs"))),
         "unsafe site id '/abs'"),
    case("predict-longitude-out-of-range",
         lambda env: env.predict(data=env.data(
             _coordinates(setv("lon", -200.0, "IL-001", "2003-01-01", 731)))),
         "column lon", "outside [-180, 180] degrees east", "e.g. -200", "site IL-001"),
    case("predict-unknown-adapter", lambda env: env.predict("--site", "IL"), "no adapter 'IL' in the store"),
    case("predict-adapter-name-traversal", lambda env: env.predict("--site", "../x"), "unsafe site '../x'"),
    case("predict-backbone-pickle-payload",
         lambda env: ["predict", "--data", str(env.data()), "--backbone", str(_evil_pt(env)), "--out",
                      "pred.csv", "--quiet", "--cpu"], "evil.pt is not a readable safetensors file"),
    case("predict-adapter-for-other-backbone",
         lambda env: env.predict("--site", "IA-001", store=env.store(env.other_adapter)),
         "was trained on backbone", "use the backbone it was made for"),
    case("predict-adapter-missing-tensor",
         lambda env: env.predict("--site", "IA-001", store=_in_store(_resigned(_missing_tensor))(env)),
         "adapter lacks blocks."),
    case("predict-adapter-huge-rank-resigned",
         lambda env: env.predict("--site", "IA-001", store=_in_store(_resigned(_rank_huge))(env)),
         "lora_rank 100000000000 exceeds what", "choose a rank <= 8"),
    case("predict-out-is-directory", lambda env: env.predict(out=str(_dir(env, "pred.csv"))),
         "'--out'", "pred.csv' is a directory"),
    case("predict-out-exists", lambda env: env.predict(out=str(_text(env.tmp / "pred.csv", "earlier\n"))),
         "pred.csv exists; pass --force"),
    case("predict-out-folder-is-a-file", lambda env: _in_the_way(env, env.predict(out="nowhere/pred.csv")),
         "output folder nowhere is not a folder"),
    case("predict-out-folder-unwritable", lambda env: env.predict(out=str(_read_only(env) / "p.csv")),
         "is not writable"),
    # --- calibrate: everything fails before training ---------------------------------------
    case("calibrate-misspelt-column",
         lambda env: env.calibrate("--site", "IA", data=env.data(rename("TMAX_AIR", "TMAX_Air"))),
         "missing column TMAX_AIR", "did you mean to rename 'TMAX_Air'"),
    case("calibrate-inf-input",
         lambda env: env.calibrate("--site", "IA",
                                   data=env.data(setv("WIND", np.inf, "IL-001", "2003-05-02"))),
         "column WIND has 1 infinite values", "site IL-001", "2003-05-02"),
    case("calibrate-duplicate-site-dates",
         lambda env: env.calibrate("--site", "IA", data=env.data(duplicate_row)),
         "1 duplicate site-dates (site IL-001, first 2004-03-05)"),
    case("calibrate-missing-latitude",
         lambda env: env.calibrate("--site", "IA", data=env.data(_coordinates(setv("lat", np.nan, n=2)))),
         "column lat has 2 NaN values (site IA-001, first 2003-07-14)"),
    case("calibrate-unknown-site", lambda env: env.calibrate("--site", "OH"), "unknown site or region 'OH'"),
    case("calibrate-site-traversal", lambda env: env.calibrate("--site", "../x"), "'../x'"),
    case("calibrate-site-nul-in-parquet",
         lambda env: env.calibrate("--site", "IA", data=env.data(rename_site("IL-001", "IL\x00001"),
                                                                 "data.parquet")),
         "unsafe site id 'IL\\x00001'"),
    case("calibrate-backbone-missing",
         lambda env: env.calibrate("--site", "IA", "--backbone", str(env.tmp / "none.safetensors")),
         "none.safetensors does not exist"),
    case("calibrate-backbone-is-directory",
         lambda env: env.calibrate("--site", "IA", "--backbone", str(_dir(env, "bb.safetensors"))),
         "bb.safetensors is a directory"),
    case("calibrate-backbone-pickle-payload",
         lambda env: env.calibrate("--site", "IA", "--backbone", str(_evil_pt(env))),
         "evil.pt is not a readable safetensors file"),
    case("calibrate-out-parent-is-a-file",
         lambda env: _in_the_way(env, env.calibrate("--site", "IA", out=env.tmp / "nowhere" / "store")),
         "nowhere is not a folder"),
    case("calibrate-out-is-a-file",
         lambda env: env.calibrate("--site", "IA", out=_text(env.tmp / "adapters", "a file\n")),
         "'--out'", "adapters' is a file"),
    case("calibrate-existing-adapter", _existing_adapter, "exists; pass --force"),
    # --- adapters show / verify ------------------------------------------------------------
    case("show-truncated", lambda env: ["adapters", "show", str(_truncated(
        env.adapter, env.tmp / "IA.safetensors", 0.9))], "is not a readable safetensors file"),
    case("show-empty-file", lambda env: ["adapters", "show", str(_touch(env.tmp / "IA.safetensors"))],
         "is not a readable safetensors file"),
    case("show-directory", lambda env: ["adapters", "show", str(_dir(env, "IA.safetensors"))],
         "IA.safetensors is a directory"),
    case("show-missing", lambda env: ["adapters", "show", "IA.safetensors"], "IA.safetensors does not exist"),
    case("show-deeply-nested-metadata",
         lambda env: ["adapters", "show", str(env.edited_adapter(_deep_json("sites")))],
         "has unreadable metadata", "recursion"),
    case("verify-other-backbone", lambda env: env.verify(env.adapter, env.other),
         "was trained on backbone", "use the backbone it was made for"),
    case("verify-rank-lie", lambda env: env.verify(env.edited_adapter(_rank_2)), "content hash mismatch"),
    case("verify-rank-lie-resigned", lambda env: env.verify(env.edited_adapter(_resigned(_rank_2))),
         "adapter tensor lora.", "has shape"),
    case("verify-extra-tensor", lambda env: env.verify(env.edited_adapter(_extra_tensor)),
         "metadata field 'parameters'"),
    case("verify-extra-tensor-resigned", lambda env: env.verify(env.edited_adapter(_resigned(_extra_tensor))),
         "has unexpected tensor lora.extra.weight"),
    case("verify-missing-tensor-resigned",
         lambda env: env.verify(env.edited_adapter(_resigned(_missing_tensor))), "adapter lacks blocks."),
    case("verify-huge-rank-resigned", lambda env: env.verify(env.edited_adapter(_resigned(_rank_huge))),
         "lora_rank 100000000000 exceeds what", "choose a rank <= 8"),
    case("verify-backbone-pickle-payload", lambda env: env.verify(env.adapter, _evil_pt(env)),
         "evil.pt is not a readable safetensors file"),
    case("verify-backbone-torch-state-dict", lambda env: env.verify(env.adapter, torch_pickle(env)),
         "model.pt is not a readable safetensors file"),
    # --- adapters list / import / export ---------------------------------------------------
    case("list-store-missing", lambda env: ["adapters", "list", "--store", "nowhere"],
         "adapter store nowhere does not exist"),
    case("list-store-is-file", lambda env: ["adapters", "list", "--store", str(_touch(env.tmp / "store"))],
         "is not a folder"),
    case("import-other-backbone",
         lambda env: ["adapters", "import", str(env.adapter), "--store", str(env.folder("store")),
                      "--backbone", str(env.other)], "was trained on backbone"),
    case("import-truncated",
         lambda env: ["adapters", "import", str(_truncated(env.adapter, env.tmp / "IA.safetensors", 0.6)),
                      "--store", str(env.folder("store")), "--backbone", str(env.backbone)],
         "is not a readable safetensors file"),
    case("import-extra-tensor-resigned",
         lambda env: ["adapters", "import", str(env.edited_adapter(_resigned(_extra_tensor))), "--store",
                      str(env.folder("store")), "--backbone", str(env.backbone)],
         "has unexpected tensor lora.extra.weight"),
    case("import-rank-lie-resigned",
         lambda env: ["adapters", "import", str(env.edited_adapter(_resigned(_rank_2))), "--store",
                      str(env.folder("store")), "--backbone", str(env.backbone)],
         "adapter tensor lora.", "has shape"),
    case("import-huge-rank-resigned",
         lambda env: ["adapters", "import", str(env.edited_adapter(_resigned(_rank_huge))), "--store",
                      str(env.folder("store")), "--backbone", str(env.backbone)],
         "lora_rank 100000000000 exceeds what", "choose a rank <= 8"),
    case("import-existing",
         lambda env: ["adapters", "import", str(env.copy_adapter(folder="inbox")), "--store",
                      str(env.store(env.other_adapter)), "--backbone", str(env.backbone)],
         "exists; pass --force"),
    case("import-store-missing",
         lambda env: ["adapters", "import", str(env.adapter), "--store", "nowhere", "--backbone",
                      str(env.backbone)], "adapter store nowhere does not exist"),
    case("export-existing",
         lambda env: ["adapters", "export", str(env.adapter), str(env.store(env.other_adapter))],
         "exists; pass --force"),
    case("export-folder-is-a-file", lambda env: _in_the_way(env, ["adapters", "export", str(env.adapter), "nowhere/"]),
         "output folder nowhere is not a folder"),
    case("export-backbone-missing",
         lambda env: ["adapters", "export", str(env.adapter), str(env.folder("share")), "--backbone",
                      "none.safetensors"], "none.safetensors does not exist"),
    case("export-missing-tensor-resigned",
         lambda env: ["adapters", "export", str(env.edited_adapter(_resigned(_missing_tensor))),
                      str(env.folder("share")), "--backbone", str(env.backbone)], "adapter lacks blocks."),
    # --- backbone show ---------------------------------------------------------------------
    case("backbone-show-missing", lambda env: ["backbone", "show", "none.safetensors"],
         "backbone none.safetensors does not exist"),
    case("backbone-show-directory", lambda env: ["backbone", "show", str(_dir(env, "bb.safetensors"))],
         "bb.safetensors is a directory"),
    case("backbone-show-torch-state-dict", lambda env: ["backbone", "show", str(torch_pickle(env))],
         "model.pt is not a readable safetensors file"),
    case("backbone-show-pickle-payload", lambda env: ["backbone", "show", str(_evil_pt(env))],
         "evil.pt is not a readable safetensors file"),
    case("backbone-show-truncated",
         lambda env: ["backbone", "show", str(_truncated(env.backbone, env.tmp / "cut.safetensors"))],
         "cut.safetensors is not a readable safetensors file"),
    case("backbone-show-an-adapter", lambda env: ["backbone", "show", str(env.adapter)],
         "is not a kgml-peft backbone (format 'kgml-peft/adapter')"),
    case("backbone-show-deeply-nested-config",
         lambda env: ["backbone", "show", str(env.tampered_backbone(_deep_json("config")))],
         "bad.safetensors has unreadable metadata", "recursion"),
    case("backbone-show-huge-hidden-size",
         lambda env: ["backbone", "show", str(_backbone_metadata("config", _hidden_size)(env))],
         "hidden_size must be <= 4096", "1000000"),
    case("backbone-show-training-not-an-object",
         lambda env: ["backbone", "show", str(_backbone_metadata("training", lambda old: "[1, 2]")(env))],
         "training must be a JSON object"),
    case("backbone-show-training-phase-without-keys",
         lambda env: ["backbone", "show",
                      str(_backbone_metadata("training", lambda old: '{"phases": [{}]}')(env))],
         "training phases must be objects with name, steps"),
    case("backbone-show-plot-folder-is-a-file",
         lambda env: _in_the_way(env, ["backbone", "show", str(env.shipped()), "--plot", "nowhere/curves.png"]),
         "output folder nowhere is not a folder"),
    case("backbone-show-plot-is-directory",
         lambda env: ["backbone", "show", str(env.shipped()), "--plot", str(_dir(env, "curves.png"))],
         "'--plot'", "curves.png' is a directory"),
    # --- import fluxnet: edited copies of a real tower file --------------------------------
    case("fluxnet-missing-column", lambda env: env.import_fluxnet(path=env.fluxnet(
        lambda t: t.drop_column("NEE_VUT_REF"))), "missing column NEE_VUT_REF"),
    case("fluxnet-misspelt-column", lambda env: env.import_fluxnet(path=env.fluxnet(
        _flux_rename("GPP_NT_VUT_REF", "GPP_NT_VUT_RF"))), "missing column GPP_NT_VUT_REF"),
    case("fluxnet-inf-input", lambda env: env.import_fluxnet(path=env.fluxnet(_flux_set("TA_F_MAX", "inf"))),
         "column TA_F_MAX has infinite values"),
    case("fluxnet-text-in-numeric-column",
         lambda env: env.import_fluxnet(path=env.fluxnet(_flux_set("SW_IN_F", "sunny", 2))),
         "column SW_IN_F is not numeric", "'sunny'"),
    case("fluxnet-radiation-out-of-range",
         lambda env: env.import_fluxnet(path=env.fluxnet(_flux_set("SW_IN_F", "5000", 3))),
         "column RADN", "outside [0, 45]", f"site {EDIT_SITE}", FIRST_DAY),
    case("fluxnet-duplicate-day", lambda env: env.import_fluxnet(path=env.fluxnet(_flux_duplicate_day)),
         f"day {FIRST_DAY} appears twice"),
    case("fluxnet-shorter-than-a-year", lambda env: env.import_fluxnet(path=env.fluxnet(rows=100)),
         f"site {EDIT_SITE} has only 100 days"),
    case("fluxnet-empty-file", _flux_empty, "is empty"),
    case("fluxnet-unsafe-site-in-meta", _flux_unsafe_meta, "unsafe site id '../x'"),
    case("fluxnet-meta-latitude-95",
         _flux_table("--site-meta", f"site,region,lat,lon\n{EDIT_SITE},OH,95,-83.35\n"),
         "table.csv: column lat must be in [-90, 90]", f"site {EDIT_SITE} has 95"),
    case("fluxnet-meta-longitude-minus-200",
         _flux_table("--site-meta", f"site,region,lat,lon\n{EDIT_SITE},OH,41.63,-200\n"),
         "table.csv: column lon must be in [-180, 180]", f"site {EDIT_SITE} has -200"),
    case("fluxnet-crops-unknown-crop", _flux_table("--crops", f"site,year,crop\n{EDIT_SITE},2011,wheat\n"),
         "table.csv: unknown crop 'wheat'", "maize", "soybean"),
    case("fluxnet-crops-site-year-twice",
         _flux_table("--crops", f"site,year,crop\n{EDIT_SITE},2011,maize\n{EDIT_SITE},2011,corn\n"),
         f"site {EDIT_SITE}, year 2011 is listed twice"),
    case("fluxnet-path-missing", lambda env: env.import_fluxnet(path=env.tmp / "nowhere"),
         "nowhere does not exist"),
    case("fluxnet-out-is-directory", lambda env: env.import_fluxnet(out=str(_dir(env, "flux.parquet"))),
         "'--out'", "flux.parquet' is a directory"),
    case("fluxnet-out-folder-is-a-file", lambda env: _in_the_way(env, env.import_fluxnet(out="nowhere/flux.parquet")),
         "output folder nowhere is not a folder"),
]


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(backbone_path: Path, other_backbone_path: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Valid adapter files for IA-001: one for the tiny backbone, one for the other backbone
    (random tensors, no training)."""
    folder = tmp_path_factory.mktemp("matrix")
    ours = save_adapter(folder / "ours.safetensors", random_adapter(load_backbone(backbone_path), "IA-001"))
    theirs = save_adapter(folder / "theirs.safetensors",
                          random_adapter(load_backbone(other_backbone_path), "IA-001", seed=1))
    return ours, theirs


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(spec: Case, tmp_path: Path, backbone_path: Path, other_backbone_path: Path,
             adapters: tuple[Path, Path], monkeypatch) -> None:
    """Run one row in ``tmp_path/work`` (made the working directory) with copies of the
    backbones and adapters, and check it: exit 2, one line, nothing created or changed (bytes and
    modification times), no pickle payload ran."""
    work = tmp_path / "work"
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    monkeypatch.chdir(work)
    copies = [inputs / name for name in ("backbone.safetensors", "IA-001.safetensors", "other.safetensors",
                                         "IA-001-other.safetensors")]
    for source, target in zip((backbone_path, adapters[0], other_backbone_path, adapters[1]), copies):
        shutil.copyfile(source, target)
    args = spec.setup(MEnv(work, *copies))
    before, mtimes = _snapshot(tmp_path), _mtimes(tmp_path)

    result = _runner().invoke(cli, args, catch_exceptions=True)
    check_user_error(result, args, spec.expect, tmp_path, before)
    assert _mtimes(tmp_path) == mtimes, "a file was rewritten (same bytes, new modification time)"
    assert not list(tmp_path.rglob(MARKER)), "a pickle payload ran"


@pytest.mark.parametrize("spec", CASES)
@pytest.mark.usefixtures("isolated_globals")
def test_bad_input_is_one_line_and_writes_nothing(spec: Case, tmp_path: Path, backbone_path: Path,
                                                  other_backbone_path: Path, adapters, monkeypatch) -> None:
    run_case(spec, tmp_path, backbone_path, other_backbone_path, adapters, monkeypatch)


def test_matrix_spans_every_command() -> None:
    commands = {param.id.split("-")[0] for param in CASES}
    assert {"synth", "pretrain", "evaluate", "predict", "calibrate", "show", "verify", "list", "import",
            "export", "backbone", "fluxnet"} <= commands, commands
    assert len(CASES) >= 36
