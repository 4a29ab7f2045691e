"""``kgml-peft experiment`` as a function: plan, run what is not finished yet, report."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.config import ExperimentConfig
from kgml_peft.experiments.report import aggregate, write_report
from kgml_peft.experiments.runs import Experiment


def demo_table() -> pd.DataFrame:
    """The experiment's demo data: the flux-tower flavour of the simulator (seed 0: NEE and Reco
    observed with noise and gaps, survey yields, per-state model-reality gap) with 8-10 years per
    site, so that every site has training, validation and test years and the scarcity curves
    have room (the calibration demo's flavour has 3-5 years per site)."""
    from kgml_peft.data.synthetic import SynthConfig, simulate

    return simulate(SynthConfig(seed=0, observed=True, obs_years=(8, 10)))


def run_experiment(frame: pd.DataFrame, config: ExperimentConfig, out: str | os.PathLike, *,
                   cpu: bool = True, progress: bool = True) -> dict:
    """Run every regime of ``config`` on ``frame`` into ``out`` and write the report.

    Finished runs (``<out>/runs/*.json``) are not redone, so an interrupted experiment resumes
    where it stopped. Returns the results (also written to ``<out>/results.json``).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KgmlPeftError(f"{out} is not a folder")
    if not out.parent.is_dir():
        raise KgmlPeftError(f"output folder {out.parent} does not exist")
    experiment = Experiment(frame, config, out, cpu=cpu)  # every data check before any training
    out.mkdir(exist_ok=True)
    todo = [run for run in experiment.plan.runs if not experiment.done(run)]
    bar = tqdm(todo, desc="experiment runs", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.key[:48])
        experiment.execute(run)
    results = aggregate(experiment)
    results["resumed_runs"] = len(experiment.plan.runs) - len(todo)
    write_report(results, out)
    return results
