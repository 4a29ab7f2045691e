"""``kgml-peft experiment`` as a function: plan, run what is not finished yet, report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd

from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.config import ExperimentConfig
from kgml_peft.experiments.report import aggregate, write_report
from kgml_peft.experiments.runs import Experiment
from kgml_peft.experiments.suite_baselines import fit_baselines
from kgml_peft.atomic import atomic_path, check_output_folder


def demo_table() -> pd.DataFrame:
    """The experiment's demo data: the flux-tower flavour of the simulator (seed 0: NEE and Reco
    observed with noise and gaps, survey yields, per-state model-reality gap) with 8-10 years per
    site, so that every site has training, validation and test years and the scarcity curves
    have room (the calibration demo's flavour has 3-5 years per site)."""
    from kgml_peft.data.synthetic import SynthConfig, simulate

    return simulate(SynthConfig(seed=0, observed=True, obs_years=(8, 10)))


_WORKER: dict = {}


def _start_worker(factory: Callable[[], object], gru: str = "auto") -> None:
    import torch

    from kgml_peft.model.recurrence import set_default_strategy

    torch.set_num_threads(1)  # one core per worker; the GRUs are latency bound
    set_default_strategy(gru)  # the parent's --gru: a spawned process starts from the default
    _WORKER["experiment"] = factory()


def _execute(run) -> str:
    _WORKER["experiment"].execute(run)
    return run.key


def check_jobs(jobs: object) -> int:
    """``jobs``: an integer in [1, 1024] (each is a process; checked before any folder is made)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= 1024:
        raise KgmlPeftError(f"jobs must be an integer in [1, 1024], got {jobs!r}")
    return jobs


def execute_runs(experiment, factory: Callable[[], object], first: list, rest: list, *,
                 jobs: int = 1, progress: bool = True) -> None:
    """Execute the runs ``first`` and then ``rest`` (objects with a ``key``) of ``experiment``.

    ``jobs`` > 1 runs that many spawned worker processes (one CPU core each), each holding its own
    ``factory()`` (a picklable callable that builds an experiment like ``experiment``) and this
    process's GRU strategy (``--gru``); ``first`` finishes before ``rest`` starts (later runs build
    on the first ones' models).
    """
    from tqdm.auto import tqdm

    check_jobs(jobs)
    bar = tqdm(total=len(first) + len(rest), desc="experiment runs", unit="run", disable=not progress)
    if jobs == 1:
        for run in [*first, *rest]:
            bar.set_postfix_str(run.key[:48])
            experiment.execute(run)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from kgml_peft.model.recurrence import current_strategy

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                                 initargs=(factory, current_strategy())) as pool:
            for wave in (first, rest):
                for future in as_completed([pool.submit(_execute, r) for r in wave]):
                    bar.set_postfix_str(future.result()[:48])
                    bar.update()
    bar.close()


def run_experiment(frame: pd.DataFrame, config: ExperimentConfig, out: str | os.PathLike, *,
                   cpu: bool = True, progress: bool = True, jobs: int = 1) -> dict:
    """Run every regime of ``config`` on ``frame`` into ``out`` and write the report.

    Finished runs (``<out>/runs/*.json``) are not redone, so an interrupted experiment resumes
    where it stopped. ``jobs`` > 1 runs that many worker processes (one CPU core each): the global
    models first, then every other run; each run seeds itself, so the results do not depend on
    ``jobs``. Returns the results (also written to ``<out>/results.json``).
    """
    check_jobs(jobs)
    out = _check_out(out)
    experiment = Experiment(frame, config, out, cpu=cpu)  # every data check before any training
    baselines = fit_baselines(experiment)  # the report's baselines: checked before any training too
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, experiment.identity())
    todo = [run for run in experiment.plan.runs if not experiment.done(run)]
    first = [r for r in todo if r.method == "scratch" and r.regions == experiment.regions]
    execute_runs(experiment, partial(Experiment, frame, config, str(out), cpu=cpu), first,
                 [r for r in todo if r not in first], jobs=jobs, progress=progress)
    results = aggregate(experiment, baselines)
    results["resumed_runs"] = len(experiment.plan.runs) - len(todo)
    write_report(results, out)
    return results


def claim_folder(out: Path, identity: dict) -> None:
    """Resume only what this experiment wrote: ``<out>/experiment.json`` records the config, data
    hash, scaling and new fields of the runs in ``out``; another experiment's folder (or one written
    before the record existed) is refused instead of mixing its runs into this report."""
    record = out / "experiment.json"
    identity = json.loads(json.dumps(identity, sort_keys=True))
    if record.is_file():
        try:
            same = json.loads(record.read_text()) == identity
        except (OSError, ValueError):
            same = False
        if not same:
            raise KgmlPeftError(f"{out} holds the runs of another experiment (config, data, scaling, new "
                                "fields or the toolkit's record format differ); use a new --out folder or "
                                "delete this one")
        return
    if any((out / "runs").glob("*.json")):
        raise KgmlPeftError(f"{out} holds runs without {record.name} (an older version wrote them); use a "
                            "new --out folder or delete this one")
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))


def _check_out(out: str | os.PathLike) -> Path:
    """The results folder: an existing folder or a new one (created with its parents)."""
    return check_output_folder(out)


def run_realsites(frame: pd.DataFrame, config, out: str | os.PathLike, *, cpu: bool = True,
                  progress: bool = True, jobs: int = 1) -> dict:
    """Run the real-site benchmark (:mod:`.realsites`) on an imported FLUXNET table into ``out``
    and write its report; resumable and ``jobs``-independent like :func:`run_experiment`."""
    from kgml_peft.experiments.realsites import RealSiteBenchmark
    from kgml_peft.experiments.realsites_report import aggregate_realsites, write_realsites_report

    check_jobs(jobs)
    out = _check_out(out)
    bench = RealSiteBenchmark(frame, config, out, cpu=cpu)
    out.mkdir(parents=True, exist_ok=True)
    claim_folder(out, bench.identity(frame))
    todo = [run for run in bench.plan if not bench.done(run)]
    first = [r for r in todo if r.method == "pretrain"]
    execute_runs(bench, partial(RealSiteBenchmark, frame, config, str(out), cpu=cpu), first,
                 [r for r in todo if r not in first], jobs=jobs, progress=progress)
    results = aggregate_realsites(bench)
    results["resumed_runs"] = len(bench.plan) - len(todo)
    write_realsites_report(results, out)
    return results
