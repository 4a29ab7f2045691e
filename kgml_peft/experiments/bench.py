"""``kgml-peft bench``: serving and calibration figures, measured side by side in one run.

What it does, in order (all on one device; steps 1-4 in this process, step 5 also starts the
``calibrate`` command as subprocesses); each stage is a function of its own (:func:`calibrate_sites`,
:func:`mixed_batch` + :func:`time_forward` + :func:`mixed_differences`, :func:`strategy_sweep`,
:func:`swaps_and_memory`, :func:`~kgml_peft.calibration.throughput.calibration_throughput`):

1. calibrates ``sites`` demo sites (observed flavour, seed 0) with the default adapter config and
   no cross-validation, times each calibration, then calibrates them again all together
   (batched); then times the default calibration (cross-validated) against that plain one on
   :data:`CV_SITES` sites (:func:`cross_validation_cost`, ``ratios.cv_vs_plain_calibrate``);
2. builds a mixed batch of ``sites * years_per_site`` site-years (the same sites' years from the
   synthetic demo flavour) and times, interleaved repeat by repeat so drifts hit all alike: the
   bare backbone, the peft-wrapped site model, the merged adapter on its own (merge +
   ``functional_call`` + head), the bank on the same batch with one adapter on every row
   (``single_same_size``: the merged path plus the bank's routing), and the bank on the mixed
   batch (batched, grouped, naive); it checks that the mixed batch equals the per-site peft
   predictions; then times ``predict`` on the same site-years with one-member adapters and with
   0.9 intervals from five-member adapters (:func:`interval_serving`, ``ratios.interval_vs_point``;
   ``ratios.interval_vs_point_head_only`` for head-only adapters, whose members share the GRUs);
   then as fields without adapters served by blends of their 3 nearest sites
   (:func:`blend_serving`, ``ratios.blend3_vs_single``: seconds over serving own adapters);
3. sweeps the number of distinct adapters in a batch (batched vs grouped);
4. times adapter swaps (cached and from disk) and the memory of ``memory_adapters`` resident
   adapters (process RSS growth, and tensor bytes);
5. calibration throughput in sites per minute: the ``sites`` calibrations of step 1 one after
   another and all in one batched pass (:mod:`kgml_peft.calibration.batched`), and the
   ``calibrate`` command for the same sites in 1 and ``processes`` processes, each plain and
   batched (:mod:`kgml_peft.calibration.throughput`).

Throughputs are site-days per second (site-years x 365 / wall seconds). Before step 1 the C++ day
loop (:mod:`kgml_peft.model.native`) is built or loaded, and its seconds are reported on their own
(``machine.native_day_loop``), never inside a timing.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kgml_peft import schema, uncertainty
from kgml_peft.calibration.calibrate import calibrate_unit, calibration_units, prepare_unit
from kgml_peft.calibration.config import CalibrationConfig
from kgml_peft.calibration.runs import demo_table
from kgml_peft.calibration.throughput import InProcess, calibration_throughput, time_in_process
from kgml_peft.data.synthetic import SynthConfig, simulate
from kgml_peft.data.tables import validate_table
from kgml_peft.data.windows import WindowDataset, make_windows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.model import native
from kgml_peft.model.outputs import physical
from kgml_peft.serve.bank import AdapterBank
from kgml_peft.serve.predict import predict_table
from kgml_peft.store.adapter import Adapter, save_adapter
from kgml_peft.store.checkpoint import Backbone, load_backbone
from kgml_peft.store.library import adapter_path
from kgml_peft.tuners.site_model import SiteModel
from kgml_peft.provenance import provenance


#: sites whose default (cross-validated) calibration is timed against the plain one
CV_SITES = 2
#: members per adapter in the interval-serving stage (the default of a cross-validated calibration)
INTERVAL_MEMBERS = 5
#: neighbours per blend in the blend-serving stage
BLEND_NEIGHBOURS = 3

#: Upper bounds of the bench's counts: each sizes loops or resident adapters, so a typo (1e11)
#: is refused at once instead of running out of memory hours later.
BENCH_LIMITS: dict[str, int] = {"sites": 1000, "years_per_site": 1000, "repeats": 10_000, "swaps": 100_000,
                                "memory_adapters": 100_000, "epochs": 100_000}


@dataclass(frozen=True)
class BenchConfig:
    """What ``kgml-peft bench`` measures and how often (``quick`` shrinks everything for tests)."""

    backbone: str = str(Path("checkpoints") / "demo.safetensors")
    sites: int = 8
    years_per_site: int = 8
    repeats: int = 9
    swaps: int = 200
    memory_adapters: int = 1000
    epochs: int | None = None  # calibration epochs; None = the default calibration config
    #: processes of the sharded calibration command (``torchrun``) in the throughput stage
    processes: int = 2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or not 2 <= self.processes <= 1024:
            raise KgmlPeftError(f"bench processes must be an integer in [2, 1024], got {self.processes!r}")
        for key, most in BENCH_LIMITS.items():
            value = getattr(self, key)
            if key == "epochs" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise KgmlPeftError(f"bench {key} must be an integer in [1, {most}], got {value!r}")

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        """A small run for tests and CI (seconds, same keys)."""
        values = {"sites": 3, "years_per_site": 2, "repeats": 2, "swaps": 20, "memory_adapters": 30,
                  "epochs": 1}
        values.update(overrides)
        return cls(**values)


def _rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(methods: dict[str, Callable[[], object]], repeats: int,
                 device: torch.device) -> dict[str, float]:
    """Median seconds per call of each method, timed round-robin (one warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def calibrate_sites(backbone: Backbone, config: BenchConfig,
                    device: torch.device) -> tuple[list[str], CalibrationConfig, InProcess]:
    """Stage 1: calibrate the first ``config.sites`` demo sites, one after another and batched."""
    observed = validate_table(demo_table(), backbone.config.features)
    sites = list(dict.fromkeys(observed[schema.SITE]))[:config.sites]
    if len(sites) < config.sites:
        raise KgmlPeftError(f"the demo data has only {len(sites)} sites; bench --sites {config.sites}")
    calibration = CalibrationConfig(seed=config.seed, cv="none",
                                    **({"epochs": config.epochs} if config.epochs else {}))
    units = [prepare_unit(backbone, rows, name, scope, calibration)
             for site in sites for name, scope, rows in calibration_units(observed, site)]
    return sites, calibration, time_in_process(backbone, units, calibration, cpu=device.type == "cpu")


def cross_validation_cost(backbone: Backbone, config: BenchConfig, calibration: CalibrationConfig,
                          device: torch.device) -> dict[str, float]:
    """Stage 1b: seconds per site of the default calibration (cross-validated: folds, shapes,
    members and widths) and of the plain one (``cv = "none"``), on the first
    :data:`CV_SITES` sites, alternating site by site."""
    observed = validate_table(demo_table(), backbone.config.features)
    sites = list(dict.fromkeys(observed[schema.SITE]))[:min(CV_SITES, config.sites)]
    units = [prepare_unit(backbone, rows, name, scope, calibration)
             for site in sites for name, scope, rows in calibration_units(observed, site)]
    folds = replace(calibration, cv="folds")
    cv_units = [prepare_unit(backbone, rows, name, scope, folds)
                for site in sites for name, scope, rows in calibration_units(observed, site)]
    seconds: dict[str, list[float]] = {"plain": [], "cv": []}
    for plain, cv in zip(units, cv_units):
        for key, unit, cfg in (("plain", plain, calibration), ("cv", cv, folds)):
            start = time.perf_counter()
            calibrate_unit(backbone, unit, cfg, cpu=device.type == "cpu", progress=False)
            seconds[key].append(time.perf_counter() - start)
    return {k: statistics.mean(v) for k, v in seconds.items()}


def mixed_batch(backbone: Backbone, config: BenchConfig, sites: list[str],
                device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """Stage 2's batch: ``years_per_site`` synthetic years of each calibrated site (inputs on
    ``device``, and each row's site)."""
    synthetic = validate_table(simulate(SynthConfig(seed=config.seed)), backbone.config.features, targets=[])
    windows = make_windows(synthetic[synthetic[schema.SITE].isin(sites)], backbone.config.features)
    index = np.concatenate([np.flatnonzero(windows.sites == s)[:config.years_per_site] for s in sites])
    if len(index) < config.sites * config.years_per_site:
        raise KgmlPeftError(f"the demo data has fewer than {config.years_per_site} years per site")
    windows = windows.subset(index)
    return WindowDataset(windows, backbone.scalers).x.to(device), [str(s) for s in windows.sites]


def serving_table(backbone: Backbone, config: BenchConfig, sites: list[str]):
    """The synthetic site-day table behind stage 2's batch (``years_per_site`` years per site)."""
    synthetic = validate_table(simulate(SynthConfig(seed=config.seed)), backbone.config.features, targets=[])
    synthetic = synthetic[synthetic[schema.SITE].isin(sites)]
    years = synthetic[schema.DATE].dt.year
    first = years.groupby(synthetic[schema.SITE]).transform("min")
    return synthetic[years < first + config.years_per_site]


def with_members(adapters: dict[str, Adapter], members: int) -> dict[str, Adapter]:
    """Timing stand-ins for cross-validated adapters: site i's members 2..M are the other sites'
    adapters (real tensors of the same config, so every member is a distinct row adapter), and
    valid conformal widths (their values do not change the work)."""
    names = list(adapters)
    residuals = np.linspace(-1.0, 1.0, 1000)
    daily = uncertainty.daily_table(residuals, np.zeros_like(residuals), np.full_like(residuals, 0.1))
    annual = uncertainty.annual_table(np.tile(residuals[:365], (3, 1)))
    record = {"method": "bench stand-in", "daily": {t: daily for t in uncertainty.INTERVAL_TARGETS},
              "annual": {t: annual for t in uncertainty.INTERVAL_TARGETS}}
    out = {}
    for i, name in enumerate(names):
        others = [adapters[names[(i + m) % len(names)]].tensors for m in range(1, members)]
        info = {**adapters[name].info, "metrics": {**adapters[name].info.get("metrics", {}), "intervals": record}}
        out[name] = replace(adapters[name], info=info, members=[dict(t) for t in others])
    return out


def head_only(adapter: Adapter) -> Adapter:
    """``adapter`` cut down to its calibration head: the shape cross-validation writes for one
    calibration year (:func:`~kgml_peft.calibration.selection.shape_menu`)."""
    if "head" not in adapter.config.components:
        raise KgmlPeftError(f"adapter {adapter.site} has no head")
    return replace(adapter, config=replace(adapter.config, components=("head",)),
                   tensors={k: v for k, v in adapter.tensors.items() if k.startswith("head.")})


def interval_serving(backbone: Backbone, adapters: dict[str, Adapter], sites: list[str],
                     config: BenchConfig, device: torch.device) -> dict[str, float]:
    """Stage 2b: ``predict`` of stage 2's site-years, every row with its site's adapter, as point
    predictions (one-member adapters) and with 0.9 intervals (M = :data:`INTERVAL_MEMBERS`
    members per adapter, run as rows of one mixed batch); median seconds, timed interleaved.
    Twice: adapters of the configured shape (members differ in every GRU's LoRA, so each member
    runs the whole backbone) and head-only adapters (members share every GRU pass)."""
    table = serving_table(backbone, config, sites)
    timed = {}
    for label, shaped in (("", adapters), ("head_", {k: head_only(a) for k, a in adapters.items()})):
        point = AdapterBank(backbone, device=device, max_bytes=None)
        members = AdapterBank(backbone, device=device, max_bytes=None)
        for adapter in shaped.values():
            point.add(adapter)
        for adapter in with_members(shaped, INTERVAL_MEMBERS).values():
            members.add(adapter)
        timed[f"{label}point"] = lambda bank=point: predict_table(bank, table, site_column=schema.SITE)
        timed[f"{label}interval"] = lambda bank=members: predict_table(bank, table, site_column=schema.SITE,
                                                                       interval=0.9)
    return _interleaved(timed, config.repeats, device)


def blend_serving(backbone: Backbone, store: Path, sites: list[str], config: BenchConfig,
                  device: torch.device) -> dict[str, float]:
    """Stage 2c: ``predict`` of stage 2's site-years from a fresh bank on the store, each site with
    its own adapter (``single``), and the same site-years as fields without an adapter, each served
    by the blend of its :data:`BLEND_NEIGHBOURS` nearest calibrated sites (``blend``: ``predict
    --neighbours``, finding, reading and blending included); median seconds, timed interleaved."""
    table = serving_table(backbone, config, sites)
    fields = table.assign(**{schema.SITE: "field-" + table[schema.SITE].astype(str)})

    def run(frame, neighbours):
        bank = AdapterBank(backbone, store, device=device, max_bytes=None)
        return predict_table(bank, frame, site_column=schema.SITE, neighbours=neighbours)

    return _interleaved({"single": lambda: run(table, None), "blend": lambda: run(fields, BLEND_NEIGHBOURS)},
                        config.repeats, device)


def _site_model(backbone: Backbone, adapter: Adapter, device: torch.device) -> SiteModel:
    model = SiteModel(backbone.model, adapter.config).to(device).eval()
    model.load_adapter_tensors(adapter.tensors)
    return model


@torch.no_grad()
def time_forward(bank: AdapterBank, adapters: dict[str, Adapter], x: torch.Tensor, names: list[str],
                 config: BenchConfig) -> dict[str, float]:
    """Stage 2: median seconds per pass of the bare backbone, the peft site model, the merged
    adapter, the bank with one adapter on every row and the bank on the mixed batch (three
    strategies), timed interleaved."""
    first = names[0]
    mixed, single = bank.resolve(names), bank.resolve([first] * len(names))
    peft_model = _site_model(bank.backbone, adapters[first], bank.device)
    methods = {
        "bare": lambda: bank.model(x),
        "peft": lambda: peft_model(x),
        "merged": lambda: bank.run_merged(x, single[0]),  # no bank routing
        "single_same_size": lambda: bank.forward(x, single),
        "mixed": lambda: bank.forward(x, mixed),
        "grouped": lambda: bank.forward(x, mixed, strategy="grouped"),
        "naive": lambda: bank.forward(x, mixed, strategy="naive"),
    }
    return _interleaved(methods, config.repeats, bank.device)


@torch.no_grad()
def mixed_differences(bank: AdapterBank, adapters: dict[str, Adapter], x: torch.Tensor,
                      names: list[str]) -> dict[str, float]:
    """Stage 2's check: the largest difference (physical units) between the bank's mixed batch,
    per strategy, and per-site peft models on the same rows."""
    scalers = bank.backbone.scalers
    reference = {}
    for site in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == site]
        reference[site] = (rows, physical(_site_model(bank.backbone, adapters[site], bank.device)(x[rows]), scalers))
    mixed = bank.resolve(names)
    diffs = {}
    for strategy in ("batched", "grouped", "naive"):
        out = physical(bank.forward(x, mixed, strategy=strategy), scalers)
        diffs[strategy] = max(float((out[k][rows] - ref[k]).abs().max())
                              for rows, ref in reference.values() for k in ("Ra", "Rh", "NEE", "Yield"))
    return diffs


@torch.no_grad()
def strategy_sweep(bank: AdapterBank, sites: list[str], x: torch.Tensor, config: BenchConfig) -> dict[str, dict]:
    """Stage 3: site-days per second of batched vs grouped by distinct adapters per batch."""
    site_days = x.shape[0] * schema.DAYS_PER_YEAR
    sweep = {}
    for k in sorted({1, 2, 4, config.sites} & set(range(1, config.sites + 1))):
        rows = bank.resolve([sites[i % k] for i in range(x.shape[0])])
        t = _interleaved({"batched": lambda: bank.forward(x, rows, strategy="batched"),
                          "grouped": lambda: bank.forward(x, rows, strategy="grouped")},
                         max(2, config.repeats // 2), bank.device)
        sweep[str(k)] = {name: site_days / v for name, v in t.items()}
    return sweep


def swaps_and_memory(bank: AdapterBank, adapters: dict[str, Adapter], sites: list[str],
                     config: BenchConfig) -> dict:
    """Stage 4: adapter swap times (cached, from disk) and the memory of ``memory_adapters``
    resident adapters (process RSS growth, tensor bytes)."""
    for site in sites:
        bank.get(site)
    cycle = iter(range(10**9))
    swap = {"cached": lambda: bank.merged_parameters(sites[next(cycle) % len(sites)])}
    cached = _interleaved(swap, config.swaps, bank.device)["cached"] * 1000

    def from_disk() -> None:
        bank.clear()
        bank.merged_parameters(sites[next(cycle) % len(sites)])

    disk = _interleaved({"disk": from_disk}, max(10, config.swaps // 4), bank.device)["disk"] * 1000
    bank.clear()
    copies = [f"m{i:05d}-{sites[i % len(sites)]}" for i in range(config.memory_adapters)]
    for name in copies:
        save_adapter(adapter_path(bank.store, name), replace(adapters[name.split("-", 1)[1]], site=name))
    gc.collect()
    rss_before = _rss_bytes()
    for name in copies:
        bank.get(name)
    gc.collect()
    rss_after = _rss_bytes()
    return {"cached_ms": cached, "disk_ms": disk, "resident": len(bank.resident()),
            "tensor_bytes": bank.memory_bytes(),
            "rss_bytes": None if rss_before is None else rss_after - rss_before}


def run_bench(config: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    """Run the benchmark (see module docstring) and return its figures as a JSON-ready dict."""
    device = torch.device(config.device)
    loops = native.status()  # built or loaded before anything is timed; its seconds reported apart
    backbone = load_backbone(config.backbone)
    steps = tqdm(total=5, desc="bench", unit="stage", disable=not progress)
    sites, calibration, timed = calibrate_sites(backbone, config, device)
    adapters = {result.name: result.adapter for result in timed.sequential}
    cv_seconds = cross_validation_cost(backbone, config, calibration, device)
    steps.update()

    with tempfile.TemporaryDirectory(prefix="kgml-peft-bench-") as tmp:
        store = Path(tmp)
        for site, adapter in adapters.items():
            save_adapter(adapter_path(store, site), adapter)
        bank = AdapterBank(backbone, store, device=device, max_bytes=None)
        x, names = mixed_batch(backbone, config, sites, device)
        seconds = time_forward(bank, adapters, x, names, config)
        site_days = len(names) * schema.DAYS_PER_YEAR
        throughput = {k: site_days / v for k, v in seconds.items()}
        diffs = mixed_differences(bank, adapters, x, names)
        interval_seconds = interval_serving(backbone, adapters, sites, config, device)
        blend_seconds = blend_serving(backbone, store, sites, config, device)
        steps.update()
        sweep = strategy_sweep(bank, sites, x, config)
        steps.update()
        held = swaps_and_memory(bank, adapters, sites, config)
        steps.update()
        adapter_bytes = [adapter_path(store, s).stat().st_size for s in sites]

    # 5. calibration throughput: in process (one after another, batched) and the command line
    #    in 1 and N processes; N processes on one GPU would share it, so that needs N GPUs
    skip = None
    if device.type == "cuda" and torch.cuda.device_count() < config.processes:
        skip = (f"{config.processes} processes need {config.processes} GPUs, this machine has "
                f"{torch.cuda.device_count()}")
    calibration_rate = calibration_throughput(config.backbone, sites, calibration, timed, config.processes,
                                              cpu=device.type == "cpu", skip_commands=skip)
    steps.update()
    steps.close()

    scale = 1000 / config.memory_adapters
    rss_mb = None if held["rss_bytes"] is None else held["rss_bytes"] / 2**20 * scale
    backbone_bytes = Path(config.backbone).stat().st_size
    calib_seconds = timed.sequential_seconds
    return {
        "config": asdict(config),
        "provenance": provenance(),
        "machine": {"device": str(device), "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__,
                    # the C++ day loop: whether it ran, and seconds to build it (first run on a
                    # machine) or load it from torch's extension cache
                    "native_day_loop": {"available": loops.available, "reason": loops.reason,
                                        "seconds": None if loops.seconds is None else round(loops.seconds, 2)}},
        "batch": {"site_years": len(names), "sites": len(sites), "site_days": site_days},
        "throughput_site_days_per_s": {k: round(v, 1) for k, v in throughput.items()},
        "ms_per_batch": {k: round(v * 1000, 2) for k, v in seconds.items()},
        "ratios": {
            "merged_vs_bare": round(throughput["merged"] / throughput["bare"], 3),
            "peft_vs_bare": round(throughput["peft"] / throughput["bare"], 3),
            "mixed_vs_single": round(throughput["mixed"] / throughput["single_same_size"], 3),
            "mixed_vs_grouped": round(throughput["mixed"] / throughput["grouped"], 3),
            "mixed_vs_naive": round(throughput["mixed"] / throughput["naive"], 3),
            "backbone_vs_adapter_bytes": round(backbone_bytes / statistics.median(adapter_bytes), 1),
            # site-days/s with M = 5 members and intervals over one-member point predictions
            "interval_vs_point": round(interval_seconds["point"] / interval_seconds["interval"], 3),
            # the same with head-only adapters (one calibration year's shape)
            "interval_vs_point_head_only": round(interval_seconds["head_point"]
                                                 / interval_seconds["head_interval"], 3),
            # seconds of serving every site-year through a blend of 3 neighbours (blending
            # included) over serving it with its own adapter: a cost ratio, lower is better
            "blend3_vs_single": round(blend_seconds["blend"] / blend_seconds["single"], 3),
            # seconds of the default (cross-validated) calibration over the plain one, same sites
            "cv_vs_plain_calibrate": round(cv_seconds["cv"] / cv_seconds["plain"], 3),
        },
        # milliseconds kept: a quick run's plain calibration takes a fifth of a second, where
        # rounding to 0.01 s would already move the ratio of the two by 2-3 %
        "calibrate_cv_s_per_site": round(cv_seconds["cv"], 3),
        "calibrate_plain_s_per_site": round(cv_seconds["plain"], 3),
        "predict_ms": {"point": round(interval_seconds["point"] * 1000, 2),
                       "interval_5_members": round(interval_seconds["interval"] * 1000, 2),
                       "head_only_point": round(interval_seconds["head_point"] * 1000, 2),
                       "head_only_interval_5_members": round(interval_seconds["head_interval"] * 1000, 2),
                       "own_adapters": round(blend_seconds["single"] * 1000, 2),
                       "blends_of_3_neighbours": round(blend_seconds["blend"] * 1000, 2)},
        "checks": {"max_abs_diff_vs_per_site": diffs,
                   "mixed_equals_per_site_within_1e-5": diffs["batched"] <= 1e-5},
        "strategy_sweep_site_days_per_s": {k: {n: round(v, 1) for n, v in d.items()} for k, d in sweep.items()},
        "swap_ms": {"cached_median": round(held["cached_ms"], 4), "disk_median": round(held["disk_ms"], 3)},
        "memory_mb_per_1000_adapters": None if rss_mb is None else round(rss_mb, 2),
        "memory": {"adapters_loaded": held["resident"], "tensor_mb_per_1000_adapters":
                   round(held["tensor_bytes"] / 2**20 * 1000 / max(held["resident"], 1), 3),
                   "rss_available": rss_mb is not None},
        "calibration_throughput": calibration_rate,
        "calibrate_s_per_site": round(statistics.mean(calib_seconds), 2),
        "calibrate_s": {s: round(v, 2) for s, v in zip(sites, calib_seconds)},
        "adapter_bytes": int(statistics.median(adapter_bytes)),
        "backbone_bytes": backbone_bytes,
    }
