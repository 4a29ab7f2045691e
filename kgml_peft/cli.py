"""The ``kgml-peft`` command line: a thin shell over the library.

Every command's user errors (bad data, bad files, bad options) print one ``error: ...`` line on
stderr and exit with code 2; nothing is written in that case.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import click

from kgml_peft import __version__
from kgml_peft.errors import KgmlPeftError, expect_type, os_cause
from kgml_peft.text import json_ready, printable

DEFAULT_BACKBONE = Path("checkpoints") / "demo.safetensors"


class UserError(click.ClickException):
    """A :class:`KgmlPeftError` on its way out of the CLI: one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: D102 - click API
        from kgml_peft.train.processes import is_main_process

        if is_main_process():  # every process of a launched run fails alike: say it once
            click.echo(f"error: {self.format_message()}", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError | UserError:
    """A usage error as one line; a bare group name (click shows its help) stays as it is."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        return exc
    command = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
    return UserError(f"{command}{exc.format_message()}".replace("\n", " "))


class Group(click.Group):
    """A click group that turns the toolkit's errors and click's usage errors into one-line
    :class:`UserError` messages (exit code 2)."""

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: D102 - click API
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # the group's own options, e.g. --threads 0
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context):  # noqa: D102 - click API
        try:
            return super().invoke(ctx)
        except KgmlPeftError as exc:
            raise UserError(printable(str(exc))) from None
        except click.UsageError as exc:  # bad option values of a subcommand: one line too
            raise _one_line(exc) from None
        except OSError as exc:  # a full disk, a name too long, a missing or unreadable path ...
            raise UserError(_os_error_line(exc)) from None


def _os_error_line(exc: OSError) -> str:
    """An OS error at a command's boundary as one line that names the path and the cause."""
    cause = os_cause(exc)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return printable(f"{' -> '.join(paths)}: {cause}" if paths else cause)


Group.group_class = Group  # nested groups (``backbone``) handle errors the same way


@click.group("kgml-peft", cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kgml-peft")
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=1, show_default=True,
              envvar="KGML_PEFT_THREADS",
              help="CPU threads for torch. The GRUs are small and step day by day, so one thread "
                   "is as fast as several and never slowed down by other busy processes.")
@click.option("--progress", is_flag=True,
              help="Progress bars even when stderr is not a terminal (a log file, CI); by default "
                   "they show only on a terminal. A command's --quiet still turns them off.")
@click.option("--gru", type=click.Choice(["auto", "loop", "kernel"]), default="auto", show_default=True,
              envvar="KGML_PEFT_GRU",
              help="How a single adapter's GRUs run: auto = the toolkit's day loop when training on "
                   "a CPU with batches of up to 64 rows (2-3x faster at a site calibration's 8 rows, "
                   "even at 64), torch's kernel otherwise; loop or kernel force one "
                   "(kernel: as before the loop existed). Mixed-site batches always take the loop, "
                   "pretraining always the kernel.")
@click.pass_context
def cli(ctx: click.Context, threads: int, progress: bool, gru: str) -> None:
    """Site calibration of knowledge-guided carbon-flux models (KGML-ag) with small adapters."""
    import torch

    from kgml_peft.model.recurrence import default_strategy

    torch.set_num_threads(threads)
    ctx.with_resource(default_strategy(gru))


def _bars(quiet: bool) -> bool:
    """Whether a command shows progress bars: not with --quiet; otherwise on a terminal, or
    anywhere with the group's --progress (bars in a redirected log are lines of noise)."""
    if quiet:
        return False
    forced = click.get_current_context().find_root().params.get("progress", False)
    return bool(forced) or sys.stderr.isatty()


def _phase_line(phase: dict) -> str:
    """One line of a training summary's phase: steps, best epoch, best validation loss."""
    val = phase["best_val_loss"]
    return (f"phase {phase['name']:<11} steps {phase['steps']:>5}  best epoch "
            f"{phase['best_epoch']:>3}  val loss {'-' if val is None else f'{val:.4f}'}")


def _echo_json(data: object) -> None:
    """Print ``data`` as strict JSON: non-finite numbers become null (bare NaN is not JSON)."""
    click.echo(json.dumps(json_ready(data), indent=2, sort_keys=True, allow_nan=False))


@cli.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output table (.csv or .parquet).")
@click.option("--observed", is_flag=True, help="Flux-tower flavour: few years, noise, gaps, only NEE/Reco.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--max-sites-per-region", type=click.IntRange(min=1), default=None,
              help="Keep only the first N sites of each region (small data for tests).")
@click.option("--max-years-per-site", type=click.IntRange(min=1), default=None,
              help="Keep only the first N years of each site.")
@click.option("--force", is_flag=True, help="Replace an existing output table.")
@click.option("--tower-weather", is_flag=True,
              help="Also write TAVG_AIR, VPD_AIR and VPDMAX_AIR (the flux-tower inputs), derived "
                   "from the humidity columns, to pretrain FLUXNET-feature backbones.")
def synth(out: Path, observed: bool, seed: int, max_sites_per_region: int | None,
          max_years_per_site: int | None, tower_weather: bool, force: bool) -> None:
    """Generate process-model demo data (Iowa, Illinois, Indiana) in the data contract."""
    from kgml_peft.data.meteo import add_flux_tower_weather
    from kgml_peft.data.synthetic import SynthConfig, simulate
    from kgml_peft.data.tables import table_format, write_table
    from kgml_peft.store.library import writable_target

    table_format(out)
    writable_target(out, force)  # fail before simulating, not after
    config = SynthConfig(seed=seed, observed=observed, max_sites_per_region=max_sites_per_region,
                         max_years_per_site=max_years_per_site)
    frame = simulate(config)
    if tower_weather:
        frame = add_flux_tower_weather(frame)
    write_table(frame, out)
    years = frame.groupby("site")["date"].agg(lambda d: d.dt.year.nunique()).sum()
    click.echo(f"wrote {out}: {len(frame)} site-days, {frame['site'].nunique()} sites, "
               f"{years} site-years ({'observed' if observed else 'synthetic'})")


@cli.group("import")
def import_group() -> None:
    """Convert external data sets into the data contract."""


@import_group.command("fluxnet")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output table (.csv or .parquet).")
@click.option("--site-meta", type=click.Path(path_type=Path), default=None,
              help="Table with site, region (and optionally static soil columns and lat, lon in "
                   "degrees) per site; a site it does not list is its own region.")
@click.option("--crops", type=click.Path(path_type=Path), default=None,
              help="Table with site, year, crop (maize/corn or soybean/soy) per site-year: writes "
                   "Crop_Type, left empty for site-years it does not list.")
@click.option("--min-qc", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Mask NEE and Reco on days whose NEE_VUT_REF_QC (share of the day measured; see --qc-counts) is lower.")
@click.option("--gpp", type=click.Choice(["NT", "DT"], case_sensitive=False), default="NT",
              show_default=True, help="GPP partitioning used as the GPP input (and its Reco).")
@click.option("--max-gap", type=click.IntRange(min=0), default=7, show_default=True,
              help="Longest run of missing input days to interpolate; a year with a longer gap "
                   "is left out.")
@click.option("--qc-counts", type=click.Choice(["measured", "good"]), default="measured",
              show_default=True,
              help="Half-hourly/hourly files: the daily NEE QC is the share of measured records "
                   "(flag 0), or of measured and good gap-filled ones (flags 0-1, as official daily "
                   "files count).")
@click.option("--force", is_flag=True, help="Replace an existing output table.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_fluxnet(paths: tuple[Path, ...], out: Path, site_meta: Path | None, crops: Path | None,
                   min_qc: float, gpp: str, max_gap: int, qc_counts: str, force: bool, as_json: bool,
                   quiet: bool) -> None:
    """Import FLUXNET files (FLUXNET2015, AmeriFlux FLUXNET, ICOS L2; daily, half-hourly or
    hourly), or folders of them, into one table."""
    from kgml_peft import schema
    from kgml_peft.data.flux_files import expand_paths
    from kgml_peft.data.fluxnet import ImportOptions, import_fluxnet as run_import
    from kgml_peft.atomic import check_outputs
    from kgml_peft.data.tables import table_format, write_table

    table_format(out)
    files = expand_paths(paths)
    check_outputs([out], [*(f.path for f in files), *(p for p in (site_meta, crops) if p is not None)],
                  force)
    options = ImportOptions(min_qc=min_qc, gpp=gpp.upper(), max_gap=max_gap, qc_counts=qc_counts)
    table, reports = run_import(files, site_meta, options, crops=crops, progress=_bars(quiet))
    write_table(table, out)
    if as_json:
        _echo_json({"out": str(out), "rows": len(table), "options": options.__dict__,
                    "sites": [r.to_dict() for r in reports]})
        return
    click.echo(f"{'site':<10}{'region':<10}{'first':<12}{'last':<12}{'days':>6}{'NEE obs':>9}"
               f"{'QC-masked':>11}{'filled':>8}  {'dropped years':<15}file")
    for r in reports:
        dropped = ", ".join(map(str, r.dropped_years)) or "-"
        click.echo(f"{r.site:<10}{r.region[:9]:<10}{r.first_date:<12}{r.last_date:<12}{r.rows:>6}"
                   f"{r.observed_nee_days:>9}{r.qc_masked_days:>11}{sum(r.filled_days.values()):>8}  "
                   f"{dropped:<15}{r.product}")
    inputs = [c for c in table.columns if c in schema.ALL_INPUTS]
    unknown = sum(len(r.unknown_crop_years) for r in reports)
    crop_note = f"; Crop_Type unknown in {unknown} site-years" if crops is not None else ""
    click.echo(f"wrote {out}: {len(table)} site-days, {len(reports)} sites; inputs {', '.join(inputs)}"
               f"{crop_note}")


@cli.command(short_help="Staged, physics-guided global pretraining; writes a backbone.")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Synthetic (process-model) table for phases 1, 2 and 4.")
@click.option("--observed", type=click.Path(path_type=Path), default=None,
              help="Observed table (NEE/Reco, survey yields) for phases 3 and 5.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML pretraining config (default: the built-in demo config).")
@click.option("--name", default="demo", show_default=True, help="Checkpoint name.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("checkpoints"), show_default=True, help="Folder for <name>.safetensors.")
@click.option("--seed", type=int, default=None, help="Override the config's seed.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None,
              help="Override the config's mixed precision.")
@click.option("--cpu", is_flag=True, help="Train on CPU even if an accelerator is available.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace an existing checkpoint of the same name.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run of the same config, data and seed from its last epoch.")
def pretrain(data: Path, observed: Path | None, config_path: Path | None, name: str, out_dir: Path,
             seed: int | None, mixed_precision: str | None, cpu: bool, quiet: bool,
             force: bool, resume: bool) -> None:
    """Global pretraining (Eq. 1) with the staged KGML-ag schedule; writes a backbone checkpoint."""
    import dataclasses

    from kgml_peft import schema
    from kgml_peft.data.tables import load_table
    from kgml_peft.atomic import check_outputs, make_folders, remove_empty
    from kgml_peft.store.checkpoint import save_backbone
    from kgml_peft.train.pretrain import PretrainConfig, pretrain_state
    from kgml_peft.train.pretrain import pretrain as run_pretrain
    from kgml_peft.train.processes import is_main_process

    schema.check_site_id(name, "checkpoint name")
    inputs = [p for p in (data, observed, config_path) if p is not None]
    [target] = check_outputs([out_dir / f"{name}.safetensors"], inputs, force)
    config = PretrainConfig.from_toml(config_path) if config_path else PretrainConfig()
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    if mixed_precision is not None:
        config = dataclasses.replace(config, mixed_precision=mixed_precision)
    features = config.backbone.features
    synthetic = load_table(data, features, require_targets=("Ra", "Rh", "NEE", "Yield"))
    obs = load_table(observed, features) if observed else None
    start = time.perf_counter()
    state = pretrain_state(target, synthetic, obs, config, resume)
    _resuming(state)
    created = make_folders(out_dir)  # --out-dir may be new; removed again if training fails
    try:
        result = run_pretrain(synthetic, obs, config, cpu=cpu, progress=_bars(quiet), state=state)
    except BaseException:
        remove_empty(created)
        raise
    if not is_main_process():  # data-parallel: every process holds the same weights
        return
    fp = save_backbone(target, result.model, result.scalers, result.summary)
    state.discard()
    for phase in result.summary["phases"]:
        click.echo(_phase_line(phase))
    for skipped in result.summary["skipped_phases"]:
        click.echo(f"phase {skipped:<11} skipped (no --observed data)")
    click.echo(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB, fingerprint {fp[:16]}) "
               f"in {time.perf_counter() - start:.0f} s")


def _resuming(state) -> None:
    """Say on stderr where a --resume run continues from (nothing to say for a fresh run)."""
    from kgml_peft.train.processes import is_main_process

    if not state.resume or not is_main_process():
        return
    saved = state.load()
    if saved is None:
        click.echo(f"no saved training state at {state.path}; starting from the beginning", err=True)
    else:
        click.echo(f"resuming from {state.path}: phase {saved.phase.result.name!r} after epoch "
                   f"{saved.phase.epoch}", err=True)


def _print_report(report: dict, as_json: bool, level: str) -> None:
    from kgml_peft.evaluation import region_table

    if as_json:
        _echo_json(report)
        return
    table = region_table(report, level)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


@cli.command()
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="Backbone checkpoint (.safetensors).")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="Table to evaluate.")
@click.option("--site", default=None, help="A site id or region label (default: everything).")
@click.option("--by", type=click.Choice(["region", "site"]), default="region", show_default=True,
              help="Rows of the printed table.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def evaluate(backbone: Path, data: Path, site: str | None, by: str, as_json: bool) -> None:
    """MSE (scaled and physical units), R^2 and physics violations per region and site."""
    from kgml_peft.data.tables import read_table
    from kgml_peft.evaluation import evaluate as run_evaluate
    from kgml_peft.store.checkpoint import load_backbone

    model = load_backbone(backbone)
    report = run_evaluate(model, read_table(data), site=site)
    _print_report(report, as_json, f"{by}s")


@cli.command()
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="Backbone checkpoint (.safetensors).")
@click.option("--seed", default=0, show_default=True, help="Seed of the demo data.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("adapters") / "demo", show_default=True,
              help="Folder for the demo's adapters (created; its state and new-field files are replaced).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def demo(backbone: Path, seed: int, out_dir: Path, quiet: bool, as_json: bool) -> None:
    """Evaluate the shipped backbone per state on the demo data, calibrate one adapter per state
    (IA, IL, IN), print validation MSE before and after, calibrate the new fields the backbone
    never saw on their earlier years and compare on their last year, and serve every site-year."""
    from kgml_peft.calibration.config import CalibrationConfig
    from kgml_peft.calibration.runs import run_calibration
    from kgml_peft.data.synthetic import SynthConfig, simulate
    from kgml_peft.evaluation import calibration_table
    from kgml_peft.evaluation import evaluate as run_evaluate
    from kgml_peft.experiments.new_fields import calibrate_new_fields, new_field_sites, state_test
    from kgml_peft.store.checkpoint import load_backbone

    model = load_backbone(backbone)
    reports = {}
    frames = {}
    for flavour, observed in (("synthetic", False), ("observed", True)):
        frames[flavour] = simulate(SynthConfig(seed=seed, observed=observed))
        reports[flavour] = run_evaluate(model, frames[flavour])
    # the paper's per-state calibration (4-6 years per site leave validation years to stop on);
    # `kgml-peft calibrate` cross-validates by default, which would take about 3 times as long
    runs = run_calibration("all", backbone_path=backbone, data=frames["observed"], out_dir=out_dir,
                           config=CalibrationConfig(cv="none"), progress=_bars(quiet), force=True)
    # the per-state adapters tested on fields of another seed: the pretraining (training and early
    # stopping) and the calibration saw only this seed's fields, so these are out of sample
    test_seed = seed + 1
    state_table = state_test(backbone, out_dir, simulate(SynthConfig(seed=test_seed, observed=True)), test_seed)
    fresh = new_field_sites(model)
    new_table = None
    if fresh:
        new_table, _ = calibrate_new_fields(backbone, frames["observed"], fresh, out_dir,
                                            progress=_bars(quiet), force=True)
    # serve every observed site-year through one bank: each row picks its state's adapter
    from kgml_peft.serve.predict import run_predict

    start = time.perf_counter()
    served = run_predict(data=frames["observed"], backbone=backbone, out=out_dir / "predictions.csv",
                         site_column="region", store=out_dir, force=True)
    serve_seconds = time.perf_counter() - start
    if as_json:
        _echo_json({**reports, "calibration": [{"path": str(r.path), "seconds": r.seconds,
                                                **r.summary} for r in runs],
                    "state_test": state_table.to_dict(orient="records"),
                    "new_fields": [] if new_table is None else new_table.to_dict(orient="records"),
                    "predictions": {"path": str(out_dir / "predictions.csv"), "site_years": served.site_years,
                                    "adapters": served.used, "seconds": serve_seconds}})
        return
    click.echo(f"backbone {backbone} (fingerprint {model.fingerprint[:16]})")
    for flavour, report in reports.items():
        click.echo(f"\n{flavour} demo data (seed {seed}), all site-years, per state "
                   "(MSE in (gC m-2 d-1)^2, Yield in (t ha-1)^2):")
        _print_report(report, False, "regions")
    if seed == 0:
        unseen = f", except the new fields {', '.join(fresh)}, which it never saw" if fresh else ""
        click.echo("\nSeed 0 is the data the shipped backbone was pretrained on (80 % of its years)"
                   f"{unseen}; --seed 1 simulates unseen sites.")
    click.echo("\nper-state calibration on the observed demo data (global backbone -> adapter, MSE in the "
               "units above). Validation = the last year of each site: the year that stopped the "
               "calibration early (and, with seed 0, the backbone's pretraining), so these figures are "
               "in-sample selection scores, not a test:")
    table = calibration_table([r.summary | {"path": str(r.path), "bytes": r.path.stat().st_size,
                                                   "seconds": r.seconds} for r in runs])
    formats = {"KiB": "{:.1f}".format, "loss_change_%": "{:+.1f}".format, "seconds": "{:.0f}".format}
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}",
                               formatters={k: f for k, f in formats.items() if k in table}))
    click.echo(f"adapters written to {out_dir}/ (backbone {backbone.stat().st_size / 1024:.0f} KiB)")
    click.echo(f"\ntest: the state adapters on the fields of seed {test_seed} (other fields and weather, "
               "never seen by the backbone's training, its early stopping or the calibration), every "
               "observed day, MSE in (gC m-2 d-1)^2:")
    click.echo(_change_table(state_table))
    if new_table is not None:
        click.echo("\nnew fields (never seen by the backbone): one adapter each from its earlier years; "
                   "test = its last year, used by neither training nor early stopping (MSE in "
                   "(gC m-2 d-1)^2, change per target):")
        click.echo(_change_table(new_table))
        better = int((new_table["NEE_change_%"] < 0).sum())
        click.echo(f"{better} of {len(new_table)} new fields predicted better with their adapter on NEE; "
                   f"mean change NEE {new_table['NEE_change_%'].mean():+.1f} %, "
                   f"Reco {new_table['Reco_change_%'].mean():+.1f} %")
    click.echo(f"\nserved all {served.site_years} observed site-years with the {len(served.used)} state "
               f"adapters from one AdapterBank (mixed-state batches) in {serve_seconds:.1f} s: "
               f"{out_dir / 'predictions.csv'} (daily Ra, Rh, Reco, NEE in gC m-2 d-1; Yield in t ha-1)")


def _change_table(table) -> str:
    """A demo table as text: MSEs with 3 decimals, ``*change_%`` columns signed with 1."""
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}",
                           formatters={c: "{:+.1f}".format for c in table if c.endswith("change_%")})


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _calibration_config(config_path: Path | None, options: dict):
    """The run's config: the TOML file (or defaults) with every given command-line option on top."""
    from kgml_peft.calibration.config import CalibrationConfig
    from kgml_peft.config_files import read_toml

    data = read_toml(config_path) if config_path else {}
    expect_type(data.get("adapter", {}), dict, f"[adapter] of {config_path}")
    adapter = dict(data.get("adapter", {}))
    for key in ("components", "lora_targets", "lora_weights", "block_targets"):
        if options.get(key) is not None:
            adapter[key] = _csv(options.pop(key))
    for key in ("lora_rank", "lora_alpha", "bottleneck", "head", "head_hidden"):
        if options.get(key) is not None:
            adapter[key] = options.pop(key)
    if adapter:
        data["adapter"] = adapter
    if options.get("targets") is not None:
        data["targets"] = {t: 1.0 for t in _csv(options.pop("targets"))}
    if options.get("unfreeze") is not None:
        data["unfreeze"] = _csv(options.pop("unfreeze"))
    data.update({k: v for k, v in options.items() if v is not None and k not in (
        "components", "lora_targets", "lora_weights", "block_targets", "lora_rank", "lora_alpha",
        "bottleneck", "head", "head_hidden", "targets", "unfreeze")})
    return CalibrationConfig.from_dict(data)


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


def _print_calibration(run) -> None:
    """The human-readable report of one calibrated unit (a :class:`CalibrationRun`)."""
    summary, path, seconds, backbone_bytes = run.summary, run.path, run.seconds, run.backbone_bytes
    data, metrics = summary["data"], summary["metrics"]
    kind = "adapter parameters" if run.is_adapter else "trained backbone parameters"
    years = (f"{data['train_site_years']} site-years, all in the folds" if "cv" in metrics else
             f"{data['train_site_years']} training / {data['val_site_years']} validation site-years")
    click.echo(f"{run.name} ({summary['scope']}, {len(summary['sites'])} site"
               f"{'s' if len(summary['sites']) != 1 else ''}): {years}, {run.trained_parameters} {kind}")
    before, after = metrics["before"], metrics["after"]
    prior = summary["calibration"].get("prior_sources")
    if prior is not None:
        click.echo("  started from its neighbours' blend: " + ", ".join(
            f"{s['site']} ({s['distance_km']:.1f} km, weight {s['weight']:.3f})" for s in prior["sources"]))
    cv = metrics.get("cv")
    if cv is not None:
        _print_cross_validation(cv)
    where = "in-sample (all data)" if cv is not None else "validation"
    click.echo(f"  {where:<26}{'global':>10}{'calibrated':>12}{'change':>9}")
    click.echo(f"  {'loss (scaled MSE)':<26}{before['loss']:>10.4f}{after['loss']:>12.4f}"
               f"{_change(before['loss'], after['loss']):>9}")
    for target, mse in after["mse"].items():
        unit = "(t ha-1)^2" if target == "Yield" else "(gC m-2 d-1)^2"
        label = f"{target} MSE {unit}"
        click.echo(f"  {label:<26}{before['mse'][target]:>10.4f}{mse:>12.4f}"
                   f"{_change(before['mse'][target], mse):>9}")
    if cv is None:
        click.echo(f"  best epoch {metrics['best_epoch']} of {metrics['epochs_run']} "
                   f"({metrics['steps']} steps)")
    size = path.stat().st_size
    ratio = f", {backbone_bytes / size:.0f}x smaller than the backbone" if run.is_adapter else ""
    group = run.summary["calibration"].get("batched_with")
    timing = (f"in {seconds:.1f} s (its share of a pass with {len(group)} units)" if group
              else f"in {seconds:.0f} s")
    click.echo(f"wrote {path} ({size / 1024:.1f} KiB{ratio}) {timing}")


def _print_cross_validation(cv: dict) -> None:
    """What cross-validation chose, and its out-of-sample estimate (mean and sd over folds)."""
    folds = f"{len(cv['folds'])} folds ({', '.join(cv['folds'])})"
    if cv["strength"] == 0:
        best = cv.get("best_adapter_change_mean")
        click.echo(f"  cross-validation on {folds}: the global model is best for this site "
                   f"(the best adapter changed the fold loss by {100 * best:+.1f}%); "
                   "wrote an identity adapter")
        return
    click.echo(f"  cross-validation on {folds}: {cv['shape']} adapter at strength {cv['strength']:g}, "
               f"{cv['epochs']} epochs")
    click.echo(f"  fold estimate of the change vs the global model: loss {100 * cv['change_mean']:+.1f}% "
               f"(sd {100 * cv['change_sd']:.1f}% over folds)")


@cli.command(short_help="Calibrate the backbone to a site or region; writes an adapter.")
@click.option("--site", required=True,
              help="A site id, a region label (all its sites, pooled), a comma-separated list of "
                   "them, or 'all' (one per region). Under a multi-process launcher the units are "
                   "shared out among the processes.")
@click.option("--data", "data", type=click.Path(path_type=Path), default=None,
              help="Site table (.csv/.parquet). Default: the built-in demo data (observed flavour, "
                   "seed 0).")
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="Global backbone checkpoint; never modified.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("adapters"), show_default=True, help="Adapter store (folder; created if missing).")
@click.option("--method", type=click.Choice(["adapter", "full", "scratch"]), default=None,
              help="adapter (Eq. 3, default), full (Eq. 2: <site>-full.safetensors) or scratch "
                   "(site-only baseline: <site>-scratch.safetensors).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML calibration config; options given here override it.")
@click.option("--components", default=None, help="Adapter parts, e.g. lora,blocks,head.")
@click.option("--rank", "lora_rank", type=int, default=None, help="LoRA rank.")
@click.option("--alpha", "lora_alpha", type=float, default=None, help="LoRA alpha.")
@click.option("--lora-targets", default=None, help="GRUs with LoRA, e.g. gru_ra,gru_rh,gru_nee.")
@click.option("--lora-weights", default=None, help="GRU matrices with LoRA: ih, hh or ih,hh.")
@click.option("--block-targets", default=None, help="GRUs followed by a bottleneck block.")
@click.option("--bottleneck", type=int, default=None, help="Inner size of the bottleneck blocks.")
@click.option("--head", type=click.Choice(["affine", "mlp"]), default=None,
              help="Calibration head: per-output scale/shift, or plus a residual feature MLP.")
@click.option("--head-hidden", type=int, default=None, help="Hidden size of the head's MLP.")
@click.option("--targets", default=None,
              help="Targets to fit, e.g. NEE,Reco (default: every target the data observes).")
@click.option("--unfreeze", default=None,
              help="Backbone parameter prefixes that also train (mu-anchored), e.g. nee_out.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=None, help="Site-years per batch.")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default=None,
              help="Learning-rate schedule.")
@click.option("--patience", type=int, default=None,
              help="Stop after this many epochs without validation improvement (0 = never).")
@click.option("--rho", type=float, default=None, help="Weight of ||phi_s||^2 (Eq. 3).")
@click.option("--mu", type=float, default=None, help="Weight of ||theta_s - theta||^2 (Eq. 2).")
@click.option("--lambda", "physics_weight", type=float, default=None, help="Weight of L_phys.")
@click.option("--response-weight", type=float, default=None,
              help="Weight of GPP-response consistency with the global backbone.")
@click.option("--val-fraction", type=float, default=None,
              help="Fraction of each site's (last) years held out for early stopping.")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--dtype", "storage_dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Storage dtype of the adapter tensors.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default=None)
@click.option("--cv", type=click.Choice(["auto", "folds", "none"]), default=None,
              help="folds: choose epochs, adapter shape and strength on cross-validation folds "
                   "(leave one year out; day blocks for one year), report their estimate and keep "
                   "members and interval widths; none: early stopping on the last years; auto "
                   "(default): folds for the adapter method, none with --method full/scratch, "
                   "--unfreeze or --batch-sites > 1. See docs/calibration.md.")
@click.option("--members", type=int, default=None,
              help="Most members a cross-validated adapter keeps for intervals (default 5).")
@click.option("--prior", type=click.Choice(["none", "neighbours"]), default=None,
              help="neighbours: start each adapter from the blend of the calibrated adapters nearest "
                   "to it in --out (needs lat/lon) and pull it towards that blend (rho ||phi - phi_nb||^2); "
                   "see docs/neighbours.md.")
@click.option("--prior-k", type=int, default=None, help="Neighbours in the prior (default 3).")
@click.option("--batch-sites", type=int, default=None,
              help="Calibrate up to this many units side by side in one pass over the backbone "
                   "(default 1: one after another); see docs/scaling.md.")
@click.option("--cpu", is_flag=True, help="Train on CPU even if an accelerator is available.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--resume", is_flag=True,
              help="Continue interrupted units from their last epoch (batched groups from their "
                   "start); skip units this same run (config, data, seed, backbone) already wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the validation curves and before/after MSE to this PNG.")
def calibrate(site: str, data: Path | None, backbone: Path, out_dir: Path, config_path: Path | None,
              cpu: bool, quiet: bool, force: bool, resume: bool, as_json: bool, plot: Path | None,
              **options) -> None:
    """Calibrate the global backbone to a site or region (Eq. 3 adapter, or Eq. 2 / site-only
    backbones with --method) and print validation MSE before and after."""
    from kgml_peft.calibration.runs import run_calibration
    from kgml_peft.train.processes import is_main_process

    config = _calibration_config(config_path, options)
    runs = run_calibration(site, backbone_path=backbone, data=data, out_dir=out_dir, config=config,
                           cpu=cpu, progress=_bars(quiet), force=force, resume=resume,
                           inputs=[config_path] if config_path else [],
                           also_writes=[plot] if plot else [])
    if not is_main_process():
        return  # the main process reports every unit, its own and the others'
    trained = [r for r in runs if not r.skipped]
    if plot is not None and not trained:
        click.echo(f"every unit was already written by this run; {plot} not drawn", err=True)
    if plot is not None and trained:
        from kgml_peft.experiments.figures import plot_calibration

        plot_calibration({r.name: {"curve": r.curve, "metrics": r.summary["metrics"]} for r in trained},
                         plot, f"Calibration of {backbone.name} ({config.method})")
    if as_json:
        _echo_json([{"path": str(r.path), "bytes": r.path.stat().st_size, "seconds": r.seconds,
                     "process": r.process,
                     **(r.summary if not r.skipped else {"site": r.name, "skipped": True})}
                    for r in runs])
        return
    if data is None:
        click.echo("data: built-in demo data (observed flavour, seed 0)")
    for run in runs:
        if run.skipped:
            click.echo(f"{run.name}: already written by this run ({run.path}); skipped")
        else:
            _print_calibration(run)


def _device(cpu: bool) -> str:
    """The device Accelerate picks for this process (``cpu`` forces the CPU)."""
    from accelerate import PartialState

    return "cpu" if cpu else str(PartialState().device)


@cli.command(short_help="Predict daily fluxes and yield with the backbone and site adapters.")
@click.option("--data", "data", type=click.Path(path_type=Path), default=None,
              help="Site-day table (.csv or .parquet; default: the built-in demo data).")
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="Backbone checkpoint.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Prediction table to write (.csv or .parquet).")
@click.option("--site", default=None, help="Apply this adapter to every row.")
@click.option("--site-column", type=click.Choice(["site", "region"]), default=None,
              help="Pick each row's adapter by its site id or its region label.")
@click.option("--adapters", "store", type=click.Path(path_type=Path), default=Path("adapters"),
              show_default=True, help="Adapter store (folder of <name>.safetensors).")
@click.option("--require-adapter", is_flag=True,
              help="Refuse rows whose adapter does not exist instead of using the backbone.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Site-years per forward pass.")
@click.option("--strategy", type=click.Choice(["auto", "batched", "grouped", "naive"]), default="auto",
              show_default=True, help="How batches that mix adapters run (see docs/serving.md).")
@click.option("--cpu", is_flag=True, help="Predict on CPU even if an accelerator is available.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
@click.option("--interval", type=float, default=None,
              help="Add NEE/Reco bounds at this coverage level, e.g. 0.9 (adapters calibrated with "
                   "--cv folds; see docs/calibration.md).")
@click.option("--annual", type=click.Path(path_type=Path), default=None,
              help="Also write annual NEE/Reco sums per site-year (.csv/.parquet), with bounds "
                   "when --interval is given.")
@click.option("--neighbours", type=int, default=None,
              help="With --site-column site: a site without an adapter gets a blend of the K "
                   "adapters nearest to its lat/lon (docs/neighbours.md).")
@click.option("--max-km", type=float, default=None,
              help="With --neighbours: only adapters within this distance; farther sites keep the backbone.")
def predict(data: Path | None, backbone: Path, out: Path, site: str | None, site_column: str | None,
            store: Path, require_adapter: bool, batch_size: int, strategy: str, cpu: bool, quiet: bool,
            force: bool, as_json: bool, interval: float | None, annual: Path | None,
            neighbours: int | None, max_km: float | None) -> None:
    """Predict Ra, Rh, Reco, NEE (daily) and Yield (annual) for every complete site-year."""
    from kgml_peft.serve.predict import run_predict

    if data is None:
        from kgml_peft.calibration.runs import demo_table

        data = demo_table()
    start = time.perf_counter()
    result = run_predict(data=data, backbone=backbone, out=out, site=site, site_column=site_column,
                         store=store, require_adapter=require_adapter, batch_size=batch_size,
                         strategy=strategy, device=_device(cpu), force=force, progress=_bars(quiet),
                         interval=interval, annual=annual, neighbours=neighbours, max_km=max_km)
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "rows": len(result.frame), "site_years": result.site_years,
               "annual": None if annual is None else str(annual), "interval": interval,
               "other_crop": result.other_crop,
               "adapters": result.used, "missing_adapters": result.missing, "blended": result.blended,
               "dropped_site_years": len(result.dropped), "seconds": round(seconds, 3)}
    if as_json:
        _echo_json(summary)
        return
    bounds = f" with {interval:g} intervals" if interval is not None else ""
    click.echo(f"wrote {out}: {len(result.frame)} site-days, {result.site_years} site-years{bounds} "
               f"in {seconds:.1f} s")
    if annual is not None:
        click.echo(f"wrote {annual}: annual NEE and Reco sums of {result.site_years} site-years{bounds}")
    if result.used:
        click.echo("adapters: " + ", ".join(f"{k} ({v})" for k, v in result.used.items()))
    if result.blended:
        click.echo(f"blends of neighbours for {len(result.blended)} site(s) without an adapter: "
                   + ", ".join(f"{site} <- {b['adapter']}" for site, b in list(result.blended.items())[:5])
                   + (" ..." if len(result.blended) > 5 else ""))
    backbone_years = result.site_years - sum(result.used.values())
    if backbone_years:
        why = (f"; no adapter for {', '.join(list(result.missing)[:5])}"
               f"{' ...' if len(result.missing) > 5 else ''}" if result.missing else "")
        click.echo(f"backbone only: {backbone_years} site-years (column adapter empty){why}")
    if result.other_crop:
        click.echo("other crops than calibrated, served by the backbone: "
                   + ", ".join(f"{k} ({v})" for k, v in result.other_crop.items()))
    if result.dropped:
        click.echo(f"left out: {len(result.dropped)} incomplete site-years")


@cli.command(short_help="Serving and calibration figures, measured side by side (JSON).")
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="Backbone checkpoint.")
@click.option("--sites", type=click.IntRange(min=1), default=8, show_default=True,
              help="Demo sites to calibrate and mix in one batch.")
@click.option("--years-per-site", type=click.IntRange(min=1), default=8, show_default=True,
              help="Site-years per site in the mixed batch.")
@click.option("--repeats", type=click.IntRange(min=1), default=9, show_default=True,
              help="Timed repeats per method (medians are reported).")
@click.option("--memory-adapters", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Adapters loaded for the memory figure.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Calibration epochs (default: the default calibration config).")
@click.option("--processes", type=click.IntRange(min=2), default=2, show_default=True,
              help="Processes of the sharded calibration command in the throughput stage.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--quick", is_flag=True, help="A small, fast run (tests, CI): same keys, rough figures.")
@click.option("--cpu", is_flag=True, help="Measure on CPU even if an accelerator is available.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON.")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON to this file.")
def bench(backbone: Path, quick: bool, cpu: bool, quiet: bool, as_json: bool, out: Path | None,
          force: bool, **options) -> None:
    """Measure adapter swaps, single-site and mixed-site throughput, memory per resident adapter,
    calibration time per site and adapter size, side by side in one run; print JSON."""
    from kgml_peft.experiments.bench import BenchConfig, run_bench
    from kgml_peft.atomic import atomic_path, check_outputs
    from kgml_peft.readable import check_regular_file

    if out is not None:
        check_outputs([out], [backbone], force)
    check_regular_file(backbone, "backbone")  # before the long calibration stage, not after
    given = {k: v for k, v in options.items()
             if click.get_current_context().get_parameter_source(k).name != "DEFAULT"}
    values = {"backbone": str(backbone), "device": _device(cpu), **given}
    config = BenchConfig.quick(**values) if quick else BenchConfig(**{**options, **values})
    result = run_bench(config, progress=_bars(quiet))
    text = json.dumps(result, indent=2, sort_keys=True)
    if out is not None:
        with atomic_path(out) as tmp:
            tmp.write_text(text + "\n")
    if as_json:
        click.echo(text)
        return
    t, r = result["throughput_site_days_per_s"], result["ratios"]
    click.echo(text)
    click.echo(f"\nmerged/bare {r['merged_vs_bare']:.2f}x, mixed/single {r['mixed_vs_single']:.2f}x, "
               f"mixed/grouped {r['mixed_vs_grouped']:.2f}x, mixed/naive {r['mixed_vs_naive']:.1f}x; "
               f"swap {result['swap_ms']['cached_median']:.3f} ms cached, "
               f"{result['swap_ms']['disk_median']:.2f} ms from disk; "
               f"{result['memory_mb_per_1000_adapters']} MB per 1000 adapters; "
               f"bare {t['bare']:.0f} site-days/s", err=True)
    rate = result["calibration_throughput"]
    if "sites_per_min" in rate:
        c = rate["sites_per_min"]
        click.echo(f"calibration: {c['sequential_in_process']:.1f} sites/min one after another, "
                   f"{c['batched_in_process']:.1f} batched ({rate['ratios']['batched_vs_sequential']:.1f}x); "
                   + ", ".join(f"{k.removeprefix('command_').replace('_', ' ')} {v:.1f}"
                               for k, v in c.items() if k.startswith("command_")), err=True)


@cli.command(short_help="The paper's evaluation, or the real-site benchmark; report and figures.")
@click.option("--suite", type=click.Choice(["paper", "fluxnet", "neighbours"]), default="paper", show_default=True,
              help="paper: every regime of the paper on one data set; fluxnet: the real-site "
                   "benchmark on a table from 'kgml-peft import fluxnet'; neighbours: blends and the "
                   "neighbour prior on the demo backbone's new fields (docs/neighbours.md).")
@click.option("--data", "data", type=click.Path(path_type=Path), default=None,
              help="Site-day table with observed daily fluxes (paper suite default: the experiment's "
                   "demo data; the fluxnet suite needs one).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Results folder (created; finished runs in it are not redone).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config of the suite (default: the built-in one).")
@click.option("--quick", is_flag=True, help="Every regime, small and fast (CI): hidden size 8, 2 epochs, 1 seed.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (one CPU core each); results do not depend on it.")
@click.option("--new-fields", "new_fields", type=click.IntRange(min=0), default=None,
              help="paper suite: new fields per region, left out of a second global model "
                   "(default: the config's, 2; 0: none).")
@click.option("--exclude-within-km", "exclude_within_km", type=float, default=None,
              help="fluxnet suite: a held-out tower's backbones train without the development towers "
                   "closer than this (km; 0: none; default: the config's, 10). Needs lat/lon in --data "
                   "(import fluxnet --site-meta).")
@click.option("--cpu", is_flag=True, help="Train on CPU even if an accelerator is available.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def experiment(suite: str, data: Path | None, out: Path, config_path: Path | None, quick: bool, jobs: int,
               new_fields: int | None, exclude_within_km: float | None, cpu: bool, quiet: bool) -> None:
    """Run an evaluation suite and write results.json, results.md and PNG figures to --out.

    paper: site-only, global-only, cross-regional, full fine-tuning and adapters (with ablations,
    ranks, sensitivity, data scarcity and a physics audit). fluxnet: backbones pretrained on the
    development towers (from observations, or simulator then observations), then each held-out
    tower calibrated on its first 1, 2, 3 years and tested on the rest."""
    from kgml_peft.data.tables import read_table

    if quick and config_path is not None:
        raise KgmlPeftError("give --quick or --config, not both")
    start = time.perf_counter()
    if exclude_within_km is not None and suite != "fluxnet":
        raise KgmlPeftError("--exclude-within-km is an option of the fluxnet suite")
    if suite == "neighbours":
        _experiment_neighbours(data, out, config_path, quick, new_fields, cpu, quiet, start)
        return
    if suite == "fluxnet":
        if new_fields is not None:
            raise KgmlPeftError("--new-fields is an option of the paper suite; the fluxnet suite's held-out "
                                "towers are its new fields")
        _experiment_fluxnet(data, out, config_path, quick, jobs, exclude_within_km, cpu, quiet, start)
        return
    from kgml_peft.experiments.config import ExperimentConfig
    from kgml_peft.experiments.pipeline import demo_table, run_experiment

    config = (ExperimentConfig.quick() if quick else
              ExperimentConfig.from_toml(config_path) if config_path is not None else ExperimentConfig())
    if new_fields is not None:
        config = dataclasses.replace(config, new_sites_per_region=new_fields)
    frame = demo_table() if data is None else read_table(data)
    results = run_experiment(frame, config, out, cpu=cpu, progress=_bars(quiet), jobs=jobs)
    regions, targets = results["regions"], results["targets"]
    click.echo(f"{results['runs']} runs ({results['resumed_runs']} resumed) in "
               f"{time.perf_counter() - start:.0f} s; daily test MSE (gC m-2 d-1)^2, mean over seeds:")
    cols = [(r, t) for r in regions for t in targets]
    for regime in ("site_only", "global_only", "full_finetune", "adapters", "regression_global",
                   "regression_site", "climatology"):
        row = results["regimes"][regime]
        click.echo(f"  {regime:<18}" + "  ".join(f"{r} {t} {row[r][t]['mse']['mean']:.3f}" for r, t in cols))
    new = results.get("new_sites") or {}
    if new:
        ks = list(next(iter(new["global_only"].values())))
        click.echo("new fields (never seen by the global model), test MSE after calibrating on the first k years:")
        for method, by_region in new.items():
            for k in ks:
                click.echo(f"  {method:<18}{k:<4}" + "  ".join(f"{r} {t} {by_region[r][k][t]['mse']['mean']:.3f}"
                                                           for r, t in cols if r in by_region))
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'} and figures")


def _experiment_neighbours(data: Path | None, out: Path, config_path: Path | None, quick: bool,
                           new_fields: int | None, cpu: bool, quiet: bool, start: float) -> None:
    from kgml_peft.calibration.runs import demo_table
    from kgml_peft.data.tables import read_table
    from kgml_peft.experiments.neighbours import NeighbourConfig, run_neighbour_experiment

    if config_path is not None or new_fields is not None:
        raise KgmlPeftError("the neighbours suite takes no --config or --new-fields: it runs the demo "
                            "backbone's new fields with the toolkit's defaults (--quick: one seed)")
    config = NeighbourConfig.quick() if quick else NeighbourConfig()
    frame = demo_table() if data is None else read_table(data)
    results = run_neighbour_experiment(DEFAULT_BACKBONE, frame, out, config, cpu=cpu, progress=_bars(quiet))
    click.echo(f"neighbours suite in {time.perf_counter() - start:.0f} s; test MSE, mean over fields and seeds "
               "(mean ratio to global):")
    for target, entry in results["means"].items():
        click.echo(f"  {target}: " + ", ".join(
            f"{name} {value:.4f}" + (f" ({entry['mean_ratio_vs_global'][name]:.3f})"
                                     if name in entry["mean_ratio_vs_global"] else "")
            for name, value in entry.items() if name != "mean_ratio_vs_global"))
    click.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def _experiment_fluxnet(data: Path | None, out: Path, config_path: Path | None, quick: bool, jobs: int,
                        exclude_within_km: float | None, cpu: bool, quiet: bool, start: float) -> None:
    from kgml_peft.data.tables import read_table
    from kgml_peft.experiments.pipeline import run_realsites
    from kgml_peft.experiments.realsites import RealSiteConfig

    if data is None:
        raise KgmlPeftError("the fluxnet suite needs --data: a table written by 'kgml-peft import fluxnet'")
    config = (RealSiteConfig.quick() if quick else
              RealSiteConfig.from_toml(config_path) if config_path is not None else RealSiteConfig())
    if exclude_within_km is not None:
        config = dataclasses.replace(config, exclude_within_km=exclude_within_km)
    results = run_realsites(read_table(data), config, out, cpu=cpu, progress=_bars(quiet), jobs=jobs)
    from kgml_peft.experiments.realsites_report import reported_targets

    target = reported_targets(results)[0]  # tower GPP: Reco (NEE follows from it by ONEFlux's identity)
    click.echo(f"{results['runs']} runs ({results['resumed_runs']} resumed) in "
               f"{time.perf_counter() - start:.0f} s; test {target} MSE (gC m-2 d-1)^2, mean over seeds:")
    for site, by_k in results["cells"].items():
        for k, rows in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            click.echo(f"  {site} {k}y  " + "  ".join(
                f"{name} {e[target]['mse']['mean']:.3f}" if e[target]["mse"] else f"{name} -"
                for name, e in rows.items()))
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'} and figures")


@cli.group()
def backbone() -> None:
    """Inspect and compare backbone checkpoints."""


@backbone.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the staged validation-loss curves to this PNG.")
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
def backbone_show(path: Path, as_json: bool, plot: Path | None, force: bool) -> None:
    """Verify a checkpoint and print its config, fingerprint and training summary."""
    from kgml_peft.atomic import check_outputs
    from kgml_peft.store.checkpoint import load_backbone

    if plot is not None:
        check_outputs([plot], [path], force)
    b = load_backbone(path)
    if plot is not None:
        from kgml_peft.experiments.figures import plot_training_curves

        if not b.training.get("curves"):
            raise KgmlPeftError(f"{path} has no training curves to plot")
        plot_training_curves(b.training["curves"], plot, f"Pretraining of {path.name}")
    n_params = sum(p.numel() for p in b.model.parameters())
    info = {"path": str(path), "fingerprint": b.fingerprint, "bytes": path.stat().st_size,
            "parameters": n_params, "config": b.config.to_dict(),
            "phases": b.training.get("phases", []), "data": b.training.get("data", {})}
    if as_json:
        _echo_json(info)
        return
    click.echo(printable(f"{path}: {info['bytes'] / 1024:.0f} KiB, {n_params} parameters, "
                         f"fingerprint {b.fingerprint}"))
    click.echo(f"features: {', '.join(b.config.features)}")
    click.echo(f"hidden size {b.config.hidden_size}, dropout {b.config.dropout}")
    for phase in info["phases"]:
        click.echo(printable(_phase_line(phase)))  # the summary is the checkpoint writer's text


@backbone.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--atol", type=float, default=0.0, show_default=True,
              help="Absolute tolerance for float tensors (with --rtol: |a-b| <= atol + rtol*|b|).")
@click.option("--rtol", type=float, default=0.0, show_default=True,
              help="Relative tolerance for float tensors and the training summary's numbers. With "
                   "either tolerance the fingerprint (a hash of the tensors) is not compared: for "
                   "checkpoints rebuilt on another kind of CPU, which rounds differently.")
def backbone_compare(a: Path, b: Path, atol: float, rtol: float) -> None:
    """Exit 0 if two checkpoints hold the same tensors (bit for bit, or within --atol/--rtol)
    and metadata, else 1."""
    from kgml_peft.store.checkpoint import compare_checkpoints

    diffs = compare_checkpoints(a, b, atol=atol, rtol=rtol)
    if diffs:
        for line in diffs:
            click.echo(line)
        raise SystemExit(1)
    click.echo("identical tensors and metadata" if atol == rtol == 0 else
               f"same tensors and metadata within atol={atol:g}, rtol={rtol:g}")


@cli.group()
def adapters() -> None:
    """List, inspect, verify and share adapter files."""


@adapters.command("list")
@click.option("--store", type=click.Path(path_type=Path), default=Path("adapters"), show_default=True,
              help="Adapter store (folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def adapters_list(store: Path, as_json: bool) -> None:
    """One line per adapter: site, size, parameters, backbone, validation loss before/after and
    where its data came from (lat/lon; a region's centroid)."""
    from kgml_peft.store.library import list_adapters

    rows = list_adapters(store)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(printable(f"no adapters in {store}"))
        return
    click.echo(f"{'file':<28}{'site':<12}{'KiB':>6}{'params':>8}  {'backbone':<17}"
               f"{'val loss':>9}{'-> after':>10}  {'lat':>10}{'lon':>11}")
    for row in rows:
        if row["kind"] == "backbone":
            click.echo(printable(f"{row['file']:<28}(site backbone checkpoint: use it as --backbone)"))
            continue
        if row["kind"] == "unreadable":
            click.echo(printable(f"{row['file']:<28}unreadable: {row['error']}"))
            continue
        before, after = row["val_loss_before"], row["val_loss_after"]
        click.echo(printable(f"{row['file']:<28}{row['site']:<12}{row['bytes'] / 1024:>6.1f}{row['parameters']:>8}  "
                   f"{row['backbone']:<17}{_number(before):>9}{_number(after):>10}  "
                   f"{_degrees(row['lat']):>10}{_degrees(row['lon']):>11}"))


def _number(value: float | None) -> str:
    """A stored metric for a table: ``-`` when missing or not finite (e.g. no validation data)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _degrees(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


@adapters.command("show")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata and tensor list as JSON.")
def adapters_show(path: Path, as_json: bool) -> None:
    """Check one adapter file on its own and print its metadata."""
    from kgml_peft.store.adapter import read_adapter
    from kgml_peft.store.library import adapter_summary

    adapter = read_adapter(path)
    if as_json:
        _echo_json({"path": str(path), "bytes": path.stat().st_size, "site": adapter.site,
                    "backbone_fingerprint": adapter.backbone_fingerprint,
                    "adapter_config": adapter.config.to_dict(), **adapter.info,
                    "tensors": {k: list(v.shape) for k, v in adapter.tensors.items()}})
        return
    click.echo(printable(f"{path}: {path.stat().st_size / 1024:.1f} KiB"))
    click.echo(adapter_summary(adapter))  # each line made printable by adapter_summary


@adapters.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="The backbone the adapter must fit.")
def adapters_verify(path: Path, backbone: Path) -> None:
    """Check an adapter against a backbone: integrity, fingerprint, tensor shapes, a forward pass."""
    from kgml_peft.store.adapter import read_adapter
    from kgml_peft.store.checkpoint import load_backbone
    from kgml_peft.store.library import check_usable

    base = load_backbone(backbone)
    adapter = read_adapter(path)
    check_usable(adapter, base)  # fits the backbone; every member's forward pass on typical inputs
    click.echo(f"ok: {path} ({adapter.site}, {adapter.parameters} parameters) fits backbone "
               f"{backbone} ({base.fingerprint[:16]})")


@adapters.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("destination", type=click.Path())  # a str: a trailing / names a folder
@click.option("--backbone", type=click.Path(path_type=Path), default=None,
              help="Also check the adapter against this backbone before exporting.")
@click.option("--force", is_flag=True, help="Replace existing files at the destination.")
def adapters_export(path: Path, destination: str, backbone: Path | None, force: bool) -> None:
    """Copy a verified adapter out for sharing (a file, or a folder), with a .txt summary."""
    from kgml_peft.store.checkpoint import load_backbone
    from kgml_peft.store.library import export_adapter

    base = load_backbone(backbone) if backbone is not None else None
    dest, summary = export_adapter(path, destination, base, force=force,
                                   inputs=[backbone] if backbone is not None else [])
    click.echo(f"wrote {dest} ({dest.stat().st_size / 1024:.1f} KiB) and {summary}")


@adapters.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--store", type=click.Path(path_type=Path), default=Path("adapters"), show_default=True,
              help="Adapter store (folder) to add it to.")
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE,
              show_default=True, help="The local backbone the adapter must fit.")
@click.option("--force", is_flag=True, help="Replace an adapter of the same site in the store.")
def adapters_import(path: Path, store: Path, backbone: Path, force: bool) -> None:
    """Check a received adapter against the local backbone and add it to the store."""
    from kgml_peft.store.checkpoint import load_backbone
    from kgml_peft.store.library import import_adapter

    dest = import_adapter(path, store, load_backbone(backbone), force=force, inputs=[backbone])
    click.echo(f"imported {path} as {dest}")


@adapters.command("blend")
@click.option("--lat", type=float, required=True, help="Latitude of the place (degrees north, WGS84).")
@click.option("--lon", type=float, required=True, help="Longitude of the place (degrees east, WGS84).")
@click.option("--name", required=True, help="Name (site id) of the blend adapter; its file is NAME.safetensors.")
@click.option("--k", "k", type=int, default=3, show_default=True, help="How many nearest adapters to blend.")
@click.option("--max-km", type=float, default=None, help="Use only adapters within this distance (km).")
@click.option("--store", type=click.Path(path_type=Path), default=Path("adapters"), show_default=True,
              help="Adapter store (folder) to take the neighbours from.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder to write the blend to (created if missing; default: the store).")
@click.option("--backbone", type=click.Path(path_type=Path), default=DEFAULT_BACKBONE, show_default=True,
              help="The backbone every neighbour must have been calibrated on.")
@click.option("--merge", type=click.Choice(["function", "weights"]), default="function", show_default=True,
              help="function: the weighted mean of the neighbours' predictions (a multi-member file); "
                   "weights: one merged adapter (an approximation).")
@click.option("--force", is_flag=True, help="Replace an existing file of the same name.")
def adapters_blend(lat: float, lon: float, name: str, k: int, max_km: float | None, store: Path,
                   out: Path | None, backbone: Path, merge: str, force: bool) -> None:
    """Build an adapter for a place without data from the k nearest calibrated adapters,
    weighted by distance (see docs/neighbours.md)."""
    from kgml_peft.store.blend import blend_adapters, find_neighbours, save_blend
    from kgml_peft.store.checkpoint import load_backbone
    from kgml_peft.store.library import adapter_path

    adapter_path(out or store, name)  # the name is checked before anything is read
    base = load_backbone(backbone)
    neighbours = find_neighbours(store, base, lat, lon, k, max_km)
    blend = blend_adapters(neighbours, name, base, lat=lat, lon=lon, merge=merge,
                           settings={"k": k, "max_km": max_km})
    path = save_blend(blend, out or store, neighbours, force=force, inputs=[backbone])
    sources = ", ".join(f"{n.adapter.site} ({n.distance_km:.1f} km, weight {n.weight:.3f})" for n in neighbours)
    click.echo(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB, merge {merge}): blend of {sources}")


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="kgml-peft")
    except SystemExit as done:  # every normal end, user errors included (click exits through SystemExit)
        from kgml_peft.train.processes import close_process_group, end_launched, launched

        if launched():
            if "torch.distributed" in sys.modules:  # else no process group can exist
                close_process_group()
            end_launched(done.code)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
