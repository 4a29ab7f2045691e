"""Property-based fuzzing of the loaders that read files from other people: adapter files,
site-day tables, backbone checkpoints and FLUXNET2015 daily files. Random bytes, mutated valid
files and random metadata must end in the toolkit's own error (:class:`KgmlPeftError`, which the
CLI turns into one line and exit code 2) or a good load, never in another exception. Examples are
derandomised, so CI sees the same cases every run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from kgml_peft import schema
from kgml_peft.data.fluxnet import import_fluxnet
from kgml_peft.data.tables import read_table, validate_table
from kgml_peft.errors import KgmlPeftError
from kgml_peft.store.adapter import read_adapter, save_adapter
from kgml_peft.store.checkpoint import load_backbone
from tests.conftest import make_frame, random_adapter
from tests.test_fluxnet_import import DAILY, EDIT_SITE, daily_file

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


# --- backbone checkpoints --------------------------------------------------------------------
# The shipped demo backbone (182 KiB, 16 KiB of it header) is the valid file mutated here (a load
# takes ~10 ms).

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "demo.safetensors"


def _layout(path: Path) -> tuple[int, int]:
    """(end of the JSON header, file size) of a safetensors file; a stand-in when it is absent."""
    if not path.is_file():
        return 16, 32
    with path.open("rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little"), path.stat().st_size


HEADER_END, SIZE = _layout(SHIPPED)
#: What a flip writes: any byte, or one that keeps JSON well formed more often (digits, signs).
FLIP_TO = st.one_of(st.integers(0, 255), st.sampled_from(b'0123456789.-e"{}[],: '))


@st.composite
def backbone_flips(draw) -> list[tuple[int, int]]:
    """1-8 (position, byte) flips, all in one region: the header length, the JSON header (config,
    scalers, metadata), the tensor bytes, or anywhere (plain integers would mostly hit the first
    bytes, and one broken length hides every other flip)."""
    start, stop = draw(st.sampled_from([(HEADER_END, SIZE), (8, HEADER_END), (0, SIZE), (0, 8)]))
    return draw(st.lists(st.tuples(st.integers(start, stop - 1), FLIP_TO), min_size=1, max_size=8))
#: Any JSON value: what a hand edit or a foreign writer may put into a metadata field.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def valid_backbone(tmp_path_factory) -> bytes:
    if not SHIPPED.is_file():
        pytest.skip(f"shipped backbone not found at {SHIPPED}")
    path = tmp_path_factory.mktemp("fuzz") / "demo.safetensors"
    path.write_bytes(SHIPPED.read_bytes())
    load_backbone(path)  # the unmutated copy is good
    assert _layout(path) == (HEADER_END, SIZE)
    return path.read_bytes()


def _load_backbone_bytes(data: bytes) -> None:
    """Load ``data`` as a backbone: a good load (with the types ``Backbone`` promises) or the
    toolkit's error, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.safetensors"
        path.write_bytes(data)
        try:
            backbone = load_backbone(path)
        except KgmlPeftError:
            return
        assert isinstance(backbone.training, dict) and len(backbone.fingerprint) == 64


@FUZZ
@given(st.one_of(st.binary(max_size=2048),
                 # a plausible header length, then random bytes: past the first check
                 st.binary(max_size=512).map(lambda b: len(b).to_bytes(8, "little") + b)))
def test_random_bytes_are_refused_as_backbones(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.safetensors"
        path.write_bytes(data)
        with pytest.raises(KgmlPeftError):
            load_backbone(path)


@FUZZ
@given(backbone_flips())
def test_mutated_backbones_load_or_fail_with_the_toolkit_error(valid_backbone: bytes, flips) -> None:
    """Up to 8 bytes overwritten (see :func:`backbone_flips`)."""
    data = bytearray(valid_backbone)
    for position, value in flips:
        data[position] = value
    _load_backbone_bytes(bytes(data))


@FUZZ
@given(st.integers(min_value=0))
def test_truncated_backbones_are_refused(valid_backbone: bytes, cut: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.safetensors"
        path.write_bytes(valid_backbone[:cut % len(valid_backbone)])
        with pytest.raises(KgmlPeftError):
            load_backbone(path)


def _edit_inside(draw, value):
    """``value`` (parsed JSON) with one node, at a random path into it, replaced by random JSON."""
    if isinstance(value, dict) and value and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: _edit_inside(draw, value[key])}
    if isinstance(value, list) and value and draw(st.integers(0, 3)):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], _edit_inside(draw, value[i]), *value[i + 1:]]
    return draw(JSON_VALUES)


def _resign(tensors: dict, metadata: dict) -> None:
    """Recompute the fingerprint after an edit, as a buggy writer would, so that the checks behind
    it run too; metadata that does not even parse stays as it is."""
    from kgml_peft.data.windows import Scalers
    from kgml_peft.model.backbone import BackboneConfig
    from kgml_peft.store.checkpoint import fingerprint

    try:
        config = BackboneConfig.from_dict(json.loads(metadata["config"]))
        scalers = Scalers.from_dict(json.loads(metadata["scalers"]))
    except (KgmlPeftError, KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return
    metadata["fingerprint"] = fingerprint(tensors, config, scalers)


@FUZZ
@given(st.data())
def test_random_backbone_metadata_is_refused_or_harmless(valid_backbone: bytes, data) -> None:
    """Valid tensors, 1-3 metadata edits (a node inside a JSON field, a whole field as random JSON
    or text, a field removed or added), the fingerprint recomputed or not."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "src.safetensors"
        source.write_bytes(valid_backbone)
        with safe_open(str(source), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = dict(handle.metadata())
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            key = data.draw(st.sampled_from([*sorted(metadata), "extra"]), label="key")
            kind = data.draw(st.sampled_from(["inside", "json", "text", "delete"]), label="kind")
            if kind == "delete":
                metadata.pop(key, None)
            elif kind == "text":
                metadata[key] = data.draw(st.text(max_size=40), label="text")
            elif kind == "json":
                metadata[key] = json.dumps(data.draw(JSON_VALUES, label="json"))
            elif key in metadata:
                try:
                    parsed = json.loads(metadata[key])
                except ValueError:  # a plain string field (format, fingerprint, versions)
                    parsed = metadata[key]
                metadata[key] = json.dumps(_edit_inside(data.draw, parsed))
        if data.draw(st.booleans(), label="resign"):
            _resign(tensors, metadata)
        target = Path(folder) / "demo.safetensors"
        save_file(tensors, str(target), metadata=metadata)
        _load_backbone_bytes(target.read_bytes())


# --- FLUXNET2015 daily files -----------------------------------------------------------------
# A real tower file, cut to its first 400 lines (a year and a month of US-CRT, which imports),
# under its own FLUXNET2015 name (an import takes ~40 ms; most mutations fail much earlier).


@pytest.fixture(scope="module")
def fluxnet_file() -> tuple[str, str]:
    if not DAILY.is_dir():
        pytest.skip(f"real FLUXNET2015 data not found at {DAILY}")
    path = daily_file(EDIT_SITE)
    text = "".join(path.read_text().splitlines(keepends=True)[:400])
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_text(text)
        import_fluxnet([copy])  # the unmutated short file imports
    return path.name, text


def _import_fluxnet_bytes(name: str, data: bytes) -> None:
    """Import ``data`` as the daily file ``name``: a good table or the toolkit's error."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            table, reports = import_fluxnet([path])
        except KgmlPeftError:
            return
        assert len(table) >= schema.DAYS_PER_YEAR and [r.site for r in reports] == [EDIT_SITE]


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_as_fluxnet_files(fluxnet_file, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / fluxnet_file[0]
        path.write_bytes(data)
        with pytest.raises(KgmlPeftError):
            import_fluxnet([path])


@FUZZ
@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=0), st.characters(codec="utf-8")),
                min_size=1, max_size=6))
def test_edited_fluxnet_files_import_or_fail_with_the_toolkit_error(fluxnet_file, edits) -> None:
    """Up to 6 characters replaced, each in the header and first rows or anywhere in the file."""
    name, text = fluxnet_file
    chars = list(text)
    head = text.index("\n") + 200  # the header and the first two rows
    for near_top, position, char in edits:
        chars[position % (head if near_top else len(chars))] = char
    _import_fluxnet_bytes(name, "".join(chars).encode("utf-8"))


@FUZZ
@given(st.integers(min_value=0))
def test_truncated_fluxnet_files_import_or_fail_with_the_toolkit_error(fluxnet_file, cut: int) -> None:
    name, text = fluxnet_file
    data = text.encode("utf-8")
    _import_fluxnet_bytes(name, data[:cut % len(data)])
