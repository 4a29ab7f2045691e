"""The paper suite's baselines (:mod:`.baselines`), fitted on the experiment's own split and
scored on the same test site-years as its runs, so every table of ``kgml-peft experiment`` has
them beside the GRU methods.

* ``regression_global``: the Reco regression fitted on the training years of every site the
  global model trains on (for new fields: the known sites only, as the known-only global model).
* ``regression_site``: the same fitted on the calibration unit's own training years (a region's
  sites in the regimes, the field's first k years for a new field), as site-only and the
  adapters see them; ``cross_regression_<unit>`` fitted on another region (or pair).
* ``climatology``: each site's day-of-year mean of its own training years (a new field: its
  first k years), the record a modeller already has for a field with a tower.

The scarcity rows (``scarcity_<baseline>_<y>y``) fit on each site's most recent y training years,
like the GRU scarcity runs. Nothing here is random or trained by gradient, so the baselines are
computed when the report is built instead of being runs.
"""

from __future__ import annotations

import numpy as np

from kgml_peft.data.windows import YearWindows
from kgml_peft.errors import KgmlPeftError
from kgml_peft.experiments.baselines import BASELINE_OUTPUTS, Climatology, RecoRegression
from kgml_peft.metrics import site_year_errors

#: the baselines of every cell, and the ones a cell's skill is measured against
BASELINES: tuple[str, ...] = ("regression_global", "regression_site", "climatology")


def site_climatology(train: YearWindows, test: YearWindows) -> dict[str, np.ndarray]:
    """Each test window predicted by the :class:`Climatology` of its own site's ``train`` years."""
    preds: dict[str, np.ndarray] = {}
    for site in dict.fromkeys(test.sites):
        own = np.flatnonzero(train.sites == site)
        rows = np.flatnonzero(test.sites == site)
        fitted = _fitted(f"site {site}", lambda: Climatology.fit(train.subset(own))).predict(test.subset(rows))
        for name, values in fitted.items():
            preds.setdefault(name, np.full((len(test), values.shape[1]), np.nan))[rows] = values
    return preds


def _fitted(what: str, fit):
    """``fit()``, its error naming ``what`` the baseline was fitted for."""
    try:
        return fit()
    except KgmlPeftError as exc:
        raise KgmlPeftError(f"baseline for {what}: {exc}") from None


def _errors(test: YearWindows, preds: dict[str, np.ndarray]) -> dict:
    return site_year_errors(test, preds, BASELINE_OUTPUTS)


def region_baselines(experiment, region: str, everything: RecoRegression | None = None) -> dict[str, dict]:
    """Per baseline row name, its per-site-year errors on ``region``'s test years; ``everything``
    is the regression on every training year when it was fitted already (:func:`fit_baselines`)."""
    split, config = experiment.split, experiment.config
    test = split.region("test", (region,))
    own = split.region("train", (region,))

    def regression(windows: YearWindows, what: str) -> RecoRegression:
        return _fitted(what, lambda: RecoRegression.fit(windows))

    everything = everything or regression(split.train, "every region")
    preds = {"regression_global": everything.predict(test),
             "regression_site": regression(own, f"region {region}").predict(test),
             "climatology": site_climatology(own, test)}
    for years in config.scarcity:
        recent = split.region("train", (region,), years)
        fitted = regression(recent, f"region {region}, {years} year(s)")
        preds[f"scarcity_regression_site_{years}y"] = fitted.predict(test)
        preds[f"scarcity_climatology_{years}y"] = site_climatology(recent, test)
    for name, unit in experiment.plan.cross_units.items():
        preds[f"cross_regression_{name}"] = regression(split.region("train", unit), name).predict(test)
    return {name: _errors(test, values) for name, values in preds.items()}


def new_site_baselines(experiment, site: str, years: int, known: RecoRegression | None = None) -> dict[str, dict]:
    """Per baseline, its errors on new field ``site``'s test years after calibrating on ``years``;
    ``known`` is the regression on the known sites' training years when it was fitted already."""
    calibration, test = experiment.new_site_parts(site, years)
    what = f"new field {site}, first {years} year(s)"
    known = known or _fitted("the known sites",
                             lambda: RecoRegression.fit(experiment.known(experiment.split.train)))
    preds = {"regression_global": known.predict(test),
             "regression_site": _fitted(what, lambda: RecoRegression.fit(calibration)).predict(test),
             "climatology": _fitted(what, lambda: Climatology.fit(calibration)).predict(test)}
    return {name: _errors(test, values) for name, values in preds.items()}


def fit_baselines(experiment) -> dict:
    """Every baseline of ``experiment``: ``regions[region]`` (:func:`region_baselines`) and
    ``new_sites[(site, k)]`` (:func:`new_site_baselines`), each global regression fitted once.
    Milliseconds, so :func:`~.pipeline.run_experiment` calls it before any training: data a
    baseline cannot be fitted on is refused then, not after the runs, and the report reuses it."""
    split = experiment.split
    everything = _fitted("every region", lambda: RecoRegression.fit(split.train))
    out: dict = {"regions": {r: region_baselines(experiment, r, everything) for r in experiment.regions},
                 "new_sites": {}}
    if experiment.new_windows:
        known = _fitted("the known sites", lambda: RecoRegression.fit(experiment.known(split.train)))
        out["new_sites"] = {(site, k): new_site_baselines(experiment, site, k, known)
                            for site in experiment.new_windows for k in experiment.config.new_site_years}
    return out


def fitted_values(name: str) -> int:
    """The values a baseline row fits (4 for a regression, 2 x 365 per site for a climatology)."""
    return 4 if "regression" in name else 2 * 365
