"""Property-based fuzzing of the command line (issue 20): random values for each command's options.

Every command of ``kgml-peft`` is found by walking the click groups, so a new command or option
is fuzzed without editing this file. Each example gives a few of a command's options random values
of their kind (sizes up to 2**63, negative numbers, NaN and infinities, unknown choices, text with
separators and control characters, paths to files of the wrong kind or to nothing), on top of a
small valid command line. Every run must end in success (exit 0) or in exit code 2 with exactly
one ``error:`` line and no traceback, never in another exception.

Work stays bounded: the valid base names a tiny backbone and table, and options that set how long a
run trains come after the fuzzed ones (click keeps the last value). Commands whose valid run takes
minutes (``pretrain``, ``bench``, ``experiment``, ``demo``) get their fuzzed options and a missing
``--data`` or ``--backbone`` placed last, so they check every option and stop at that input.
Examples are derandomised, so CI sees the same cases every run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgml_peft.cli import cli
from tests.conftest import make_frame
from tests.test_cli_validation import _runner
from tests.test_fluxnet_import import DAILY, EDIT_SITE, CsvText

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: commands whose valid run is long: fuzzed options, then an input that does not exist
LONG = {"pretrain": ["--data", "missing.csv"], "bench": ["--backbone", "missing.safetensors"],
        "experiment": ["--data", "missing.csv", "--out", "exp"], "demo": ["--backbone", "missing.safetensors"]}
#: options that never take a random value here (output switches, help)
SKIP = {"help", "version", "quiet", "json", "as_json", "cpu", "resume"}


def _commands(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    found = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(_commands(command, (*prefix, name)))
        else:
            found[" ".join((*prefix, name))] = command
    return found


COMMANDS = _commands()


@pytest.fixture(scope="module")
def files(tmp_path_factory, backbone_path: Path, adapter_path: Path) -> dict[str, Path]:
    """Real inputs of every kind the options may be pointed at."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    store = root / "store"
    store.mkdir()
    shutil.copyfile(adapter_path, store / "IA-001.safetensors")
    data = root / "data.csv"
    make_frame().to_csv(data, index=False, date_format="%Y-%m-%d")
    (root / "notes.txt").write_text("not a table\n")
    flux = root / "data.csv"
    if DAILY.is_dir():  # a short copy of a real FLUXNET2015 daily file
        text = CsvText(EDIT_SITE)
        del text.rows[400:]
        flux = text.write(root / "towers")
    (root / "empty.csv").write_text("")
    return {"data": data, "backbone": backbone_path, "adapter": store / "IA-001.safetensors",
            "store": store, "text": root / "notes.txt", "empty": root / "empty.csv", "root": root,
            "fluxnet": flux}


def _base(name: str, files: dict[str, Path]) -> list[str]:
    """A small valid command line for ``name`` (before the fuzzed options)."""
    data, backbone, adapter, store = (str(files[k]) for k in ("data", "backbone", "adapter", "store"))
    return {
        "synth": ["--out", "synth.csv"],
        "import fluxnet": [str(files["fluxnet"]), "--out", "flux.csv"],
        "evaluate": ["--data", data, "--backbone", backbone],
        "calibrate": ["--site", "IA-001", "--data", data, "--backbone", backbone, "--out", "cal"],
        "predict": ["--data", data, "--backbone", backbone, "--out", "pred.csv", "--adapters", store],
        "backbone show": [backbone],
        "backbone compare": [backbone, backbone],
        "adapters list": ["--store", store],
        "adapters show": [adapter],
        "adapters verify": [adapter, "--backbone", backbone],
        "adapters export": [adapter, "exported.safetensors"],
        "adapters import": [adapter, "--store", "received", "--backbone", backbone],
        "adapters blend": ["--lat", "42", "--lon", "-93", "--name", "field", "--store", store,
                           "--backbone", backbone, "--out", "blends"],
    }.get(name, [])


#: options last on the line, after the fuzzed ones: they keep a valid run short
LAST = {"synth": ["--max-sites-per-region", "1", "--max-years-per-site", "1"],
        "calibrate": ["--epochs", "1", "--cv", "none", "--members", "1", "--batch-sites", "1"]}

_INTS = st.one_of(st.integers(-3, 12), st.sampled_from([0, -1, 2**31, 2**63, 10**11, 99999999999]))
_FLOATS = st.one_of(st.floats(-1e3, 1e3), st.sampled_from(["nan", "inf", "-inf", "1e308", "-0", "1e-320"]))
_TEXT = st.text(alphabet=st.sampled_from("aI01-_.,/ \n\t\x00\x1bé:"), max_size=10)


def _value(param: click.Option, files: dict[str, Path]) -> st.SearchStrategy[str]:
    kind = param.type
    if isinstance(kind, click.Choice):
        return st.sampled_from([*map(str, kind.choices), "bogus", ""])
    if isinstance(kind, click.Path):
        return st.sampled_from([str(p) for p in files.values()] + ["missing/thing.csv", "", "x" * 300])
    if isinstance(kind, (click.IntRange,)) or kind is click.INT:
        return _INTS.map(str)
    if isinstance(kind, click.FloatRange) or kind is click.FLOAT:
        return _FLOATS.map(str)
    return st.one_of(_TEXT, _INTS.map(str), st.sampled_from(["IA", "IA-001", "all", "lora,head", "../x"]))


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name not in SKIP
            and not p.is_flag and p.opts[0].startswith("--")]


@st.composite
def _command_line(draw, name: str, files: dict[str, Path]) -> list[str]:
    command = COMMANDS[name]
    options = _options(command)
    chosen = draw(st.lists(st.sampled_from(options), min_size=1, max_size=3, unique_by=lambda p: p.name)) \
        if options else []
    fuzzed = [item for option in chosen for item in (option.opts[0], draw(_value(option, files)))]
    flags = [p.opts[0] for p in command.params if isinstance(p, click.Option) and p.is_flag
             and p.name in {"force"} and draw(st.booleans())]
    return [*name.split(), *_base(name, files), *fuzzed, *flags, *LAST.get(name, []), *LONG.get(name, [])]


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.usefixtures("isolated_globals")
def test_random_option_values_end_in_success_or_one_line(name: str, files: dict[str, Path], tmp_path: Path,
                                                         monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    @FUZZ
    @given(st.data())
    def run(data) -> None:
        args = data.draw(_command_line(name, files))
        result = _runner().invoke(cli, [*args, "--quiet"] if "--quiet" in _flag_names(name) else args,
                                  catch_exceptions=True)
        detail = f"args={args!r}\nstderr={result.stderr!r}\nexception={result.exception!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), detail
        assert result.exit_code in (0, 2), detail
        assert "Traceback" not in result.output + result.stderr, detail
        if result.exit_code == 2:
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), detail

    run()


def _flag_names(name: str) -> set[str]:
    return {opt for p in COMMANDS[name].params if isinstance(p, click.Option) for opt in p.opts}


def test_every_command_is_fuzzed() -> None:
    assert {"calibrate", "predict", "evaluate", "synth", "adapters list", "adapters import", "bench",
            "pretrain", "experiment", "backbone show", "import fluxnet"} <= set(COMMANDS)
    assert all(_options(COMMANDS[name]) or not COMMANDS[name].params for name in COMMANDS
               if name not in {"backbone show", "backbone compare", "adapters show", "adapters verify",
                               "adapters list", "adapters export", "adapters import"})
