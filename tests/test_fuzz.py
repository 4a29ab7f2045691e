"""Property-based fuzzing of the two loaders that read files from other people: adapter files and
site-day tables. Random bytes, mutated valid files and random metadata must end in the toolkit's
own error (:class:`KgmlPeftError`, which the CLI turns into one line and exit code 2), never in
another exception. Examples are derandomised, so CI sees the same cases every run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from kgml_peft import schema
from kgml_peft.data.tables import read_table, validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame, random_adapter

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEATURES = schema.DEFAULT_FEATURES


@pytest.fixture(scope="module")
def valid_adapter(backbone_path, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "IA.safetensors"
    save_adapter(path, random_adapter(load_backbone(backbone_path), "IA"))
    read_adapter(path)  # the unmutated file is good
    return path.read_bytes()


def _read_adapter_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "IA.safetensors"
        path.write_bytes(data)
        try:
            read_adapter(path)
        except KgmlPeftError:
            pass


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_as_adapters(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "IA.safetensors"
        path.write_bytes(data)
        with pytest.raises(KgmlPeftError):
            read_adapter(path)


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_adapters_load_or_fail_with_the_toolkit_error(valid_adapter: bytes, flips) -> None:
    data = bytearray(valid_adapter)
    for position, value in flips:
        data[position % len(data)] = value
    _read_adapter_bytes(bytes(data))


@FUZZ
@given(st.integers(min_value=0))
def test_truncated_adapters_are_refused(valid_adapter: bytes, cut: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "IA.safetensors"
        path.write_bytes(valid_adapter[:cut % len(valid_adapter)])
        with pytest.raises(KgmlPeftError):
            read_adapter(path)


@FUZZ
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=60), max_size=8),
       st.dictionaries(st.sampled_from(["format", "format_version", "site", "adapter_config",
                                        "backbone_fingerprint", "tensor_hash", "info"]),
                       st.one_of(st.text(max_size=40), st.integers().map(str),
                                 st.dictionaries(st.text(max_size=5), st.integers()).map(json.dumps)),
                       max_size=4))
def test_random_metadata_is_refused_or_harmless(valid_adapter: bytes, extra, overrides) -> None:
    """Valid tensors with random metadata keys and values (some replacing the real ones)."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "src.safetensors"
        source.write_bytes(valid_adapter)
        with safe_open(str(source), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = dict(handle.metadata())
        metadata.update(extra)
        metadata.update(overrides)
        target = Path(folder) / "IA.safetensors"
        save_file(tensors, str(target), metadata=metadata)
        try:
            read_adapter(target)
        except KgmlPeftError:
            pass


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([".csv", ".parquet"]))
def test_random_bytes_are_refused_as_tables(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"t{suffix}"
        path.write_bytes(data)
        with pytest.raises(KgmlPeftError):
            validate_table(read_table(path), FEATURES)


@pytest.fixture(scope="module")
def valid_csv() -> str:
    return make_frame({"IA-001": "IA"}, years=(2003,)).to_csv(index=False, date_format="%Y-%m-%d")


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0), st.characters(codec="utf-8")), min_size=1, max_size=6))
def test_mutated_tables_load_or_fail_with_the_toolkit_error(valid_csv: str, edits) -> None:
    text = list(valid_csv)
    for position, char in edits:
        text[position % len(text)] = char
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.csv"
        path.write_text("".join(text), encoding="utf-8")
        try:
            validate_table(read_table(path), FEATURES)
        except KgmlPeftError:
            pass
