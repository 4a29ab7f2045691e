"""Year windows, scalers and splits: validated table -> arrays the backbone trains on.

A window is one site-year of exactly 365 days. Leap years lose 29 February (the day is dropped
before windowing, so 1 March is always day 60). Years with fewer than 365 remaining days are left
out and reported in :attr:`YearWindows.dropped`; a site without a single complete calendar year is
an error. Scalers are fitted on the training windows only and stored with the backbone.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from kgml_peft import schema
from kgml_peft.errors import KgmlPeftError


@dataclass
class YearWindows:
    """Site-years as arrays, in physical units (NaN where a target was not observed)."""

    features: tuple[str, ...]
    sites: np.ndarray  # [N] str
    regions: np.ndarray  # [N] str
    years: np.ndarray  # [N] int
    dates: np.ndarray  # [N, 365] datetime64[D]
    inputs: np.ndarray  # [N, 365, F] float64
    daily: np.ndarray  # [N, 365, len(DAILY_TARGETS)] float64, NaN = missing
    annual: np.ndarray  # [N, len(ANNUAL_TARGETS)] float64, NaN = missing
    gpp: np.ndarray  # [N, 365] float64, GPP in gC m-2 d-1 (needed by the mass balance)
    dropped: list[tuple[str, int, int]] = field(default_factory=list)  # (site, year, days)
    #: [N] float, each site-year's ``Crop_Type`` on its first day (NaN: not documented / no column)
    crops: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.crops is None:
            self.crops = np.full(len(self.sites), np.nan)

    def __len__(self) -> int:
        return len(self.sites)

    def subset(self, index: Sequence[int] | np.ndarray) -> YearWindows:
        """The windows at ``index`` (in that order)."""
        idx = np.asarray(index, dtype=int)
        return YearWindows(
            features=self.features,
            sites=self.sites[idx],
            regions=self.regions[idx],
            years=self.years[idx],
            dates=self.dates[idx],
            inputs=self.inputs[idx],
            daily=self.daily[idx],
            annual=self.annual[idx],
            gpp=self.gpp[idx],
            dropped=list(self.dropped),
            crops=self.crops[idx],
        )

    def target(self, name: str) -> np.ndarray:
        """One target's values: [N, 365] for daily targets, [N] for annual ones."""
        if name in schema.DAILY_TARGETS:
            return self.daily[..., schema.DAILY_TARGETS.index(name)]
        return self.annual[:, schema.ANNUAL_TARGETS.index(name)]


#: the column naming each site-year's crop (a feature of crop backbones; an optional attribute of
#: any table, used to keep adapters to the crops they were calibrated on)
CROP = "Crop_Type"


def make_windows(frame: pd.DataFrame, features: Sequence[str]) -> YearWindows:
    """Cut a validated table (see :func:`~kgml_peft.data.tables.validate_table`) into year windows."""
    features = tuple(features)
    frame = frame[~((frame[schema.DATE].dt.month == 2) & (frame[schema.DATE].dt.day == 29))]
    year = frame[schema.DATE].dt.year
    sizes = frame.groupby([frame[schema.SITE], year], sort=True).size()
    complete = sizes[sizes == schema.DAYS_PER_YEAR]
    dropped = [(str(s), int(y), int(n)) for (s, y), n in sizes[sizes != schema.DAYS_PER_YEAR].items()]
    sites_with_years = set(complete.index.get_level_values(0))
    for site in frame[schema.SITE].unique():
        if site not in sites_with_years:
            raise KgmlPeftError(
                f"site {site} has no complete calendar year ({schema.DAYS_PER_YEAR} days "
                "after dropping 29 February)"
            )
    keys = pd.MultiIndex.from_arrays([frame[schema.SITE], year])
    frame = frame[keys.isin(complete.index)]  # sorted by site, date -> grouped by site-year
    n = len(complete)
    days = schema.DAYS_PER_YEAR

    def block(columns: Sequence[str]) -> np.ndarray:
        out = np.full((len(frame), len(columns)), np.nan)
        for j, name in enumerate(columns):
            if name in frame.columns:
                out[:, j] = frame[name].to_numpy(dtype="float64")
        return out.reshape(n, days, len(columns))

    annual = block(schema.ANNUAL_TARGETS)
    with warnings.catch_warnings():  # an all-NaN year simply stays NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        annual_values = np.nanmean(annual, axis=1)
    first = frame.iloc[::days]
    return YearWindows(
        features=features,
        sites=first[schema.SITE].to_numpy(dtype=str),
        regions=first[schema.REGION].to_numpy(dtype=str),
        years=first[schema.DATE].dt.year.to_numpy(dtype=int),
        dates=frame[schema.DATE].to_numpy().astype("datetime64[D]").reshape(n, days),
        inputs=block(features),
        daily=block(schema.DAILY_TARGETS),
        annual=annual_values,
        gpp=frame["GPP"].to_numpy(dtype="float64").reshape(n, days),
        dropped=dropped,
        crops=(first[CROP].to_numpy(dtype="float64") if CROP in frame.columns else np.full(n, np.nan)),
    )


#: Bound on a scaler's |mean| and std (and 1 / std): a backbone file whose scalers lie outside it
#: (a std of 1e300 or 1e-300 passes a finiteness check) would overflow or divide by zero in the
#: metrics; real data lie many orders of magnitude inside.
SCALER_LIMIT = 1e12

@dataclass
class Scalers:
    """Per-column mean and standard deviation of inputs and targets (z-scores)."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, windows: YearWindows) -> Scalers:
        """Fit on ``windows`` (pass the training windows only). Targets use non-missing values."""
        mean: dict[str, float] = {}
        std: dict[str, float] = {}
        columns = {f: windows.inputs[..., j] for j, f in enumerate(windows.features)}
        columns.update({t: windows.target(t) for t in schema.TARGETS})
        for name, values in columns.items():
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                continue
            mu = float(finite.mean())
            sd = float(finite.std())
            mean[name] = mu
            std[name] = sd if sd > 1e-8 else 1.0
        return cls(mean=mean, std=std)

    def require(self, names: Sequence[str], source: str = "the training data") -> None:
        """Raise unless every one of ``names`` has a finite mean and a std > 0, within
        :data:`SCALER_LIMIT` (so that squares and ratios of scaled errors stay finite and nonzero);
        ``source`` names where the scalers came from in the message."""
        for name in names:
            mean, std = self.mean.get(name), self.std.get(name)
            if mean is None or std is None:
                raise KgmlPeftError(f"{source} has no scaler for {name}")
            if not (math.isfinite(mean) and math.isfinite(std) and abs(mean) <= SCALER_LIMIT
                    and 1 / SCALER_LIMIT <= std <= SCALER_LIMIT):
                raise KgmlPeftError(
                    f"{source} has a bad scaler for {name} (mean {mean:g}, std {std:g})"
                )

    def scale(self, name: str, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Physical units -> z-score."""
        return (values - self.mean[name]) / self.std[name]

    def unscale(self, name: str, values: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """z-score -> physical units."""
        return values * self.std[name] + self.mean[name]

    def to_dict(self) -> dict[str, dict[str, float]]:
        """JSON-ready form (stored in checkpoint metadata)."""
        return {"mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> Scalers:
        """Inverse of :meth:`to_dict`."""
        return cls(mean={k: float(v) for k, v in data["mean"].items()},
                   std={k: float(v) for k, v in data["std"].items()})


class WindowDataset(Dataset):
    """Scaled tensors of year windows for a DataLoader; missing targets become 0 with mask False."""

    def __init__(self, windows: YearWindows, scalers: Scalers) -> None:
        scalers.require(windows.features)
        x = np.stack([scalers.scale(f, windows.inputs[..., j]) for j, f in enumerate(windows.features)], -1)
        self.x = torch.as_tensor(x, dtype=torch.float32)
        daily = np.zeros_like(windows.daily)
        for j, name in enumerate(schema.DAILY_TARGETS):
            if name in scalers.mean:
                daily[..., j] = scalers.scale(name, windows.daily[..., j])
        annual = np.zeros_like(windows.annual)
        for j, name in enumerate(schema.ANNUAL_TARGETS):
            if name in scalers.mean:
                annual[:, j] = scalers.scale(name, windows.annual[:, j])
        daily_mask = np.isfinite(daily) & np.isfinite(windows.daily)
        annual_mask = np.isfinite(annual) & np.isfinite(windows.annual)
        self.daily = torch.as_tensor(np.where(daily_mask, daily, 0.0), dtype=torch.float32)
        self.daily_mask = torch.as_tensor(daily_mask)
        self.annual = torch.as_tensor(np.where(annual_mask, annual, 0.0), dtype=torch.float32)
        self.annual_mask = torch.as_tensor(annual_mask)
        self.gpp = torch.tensor(windows.gpp, dtype=torch.float32)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "x": self.x[i],
            "daily": self.daily[i],
            "daily_mask": self.daily_mask[i],
            "annual": self.annual[i],
            "annual_mask": self.annual_mask[i],
            "gpp": self.gpp[i],
        }


def split_by_year(windows: YearWindows, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per site, the last ``ceil(val_fraction * years)`` years validate, the rest train.

    A site with a single year keeps it for training. Returns (train index, validation index).
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) \
            or not 0.0 <= val_fraction < 1.0:
        raise KgmlPeftError(f"validation fraction must be a number in [0, 1), got {val_fraction!r}")
    train: list[int] = []
    val: list[int] = []
    for site in dict.fromkeys(windows.sites):
        idx = np.flatnonzero(windows.sites == site)
        idx = idx[np.argsort(windows.years[idx], kind="stable")]
        n_val = min(math.ceil(val_fraction * len(idx)), len(idx) - 1) if val_fraction > 0 else 0
        train.extend(idx[: len(idx) - n_val])
        val.extend(idx[len(idx) - n_val:])
    return np.array(sorted(train), dtype=int), np.array(sorted(val), dtype=int)


def split_by_site(windows: YearWindows, val_sites: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``val_sites`` validate, all others train. Unknown site ids are an error."""
    known = set(windows.sites)
    unknown = [s for s in val_sites if s not in known]
    if unknown:
        raise KgmlPeftError(f"unknown validation site {unknown[0]!r}")
    is_val = np.isin(windows.sites, list(val_sites))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_by_day_blocks(windows: YearWindows, block_days: int = 14,
                        every: int = 4) -> tuple[YearWindows, YearWindows]:
    """Split the *observations* of the same windows for early stopping when there is no year to
    spare: every ``every``-th block of ``block_days`` days (days of year 43-56, 99-112, ... with
    the defaults: a quarter of every season) validates, the other days train.

    Both returned windows keep every day's inputs (the GRUs read the whole year); only the daily
    targets are masked (NaN) outside each part. Annual targets stay with the training part.
    """
    if block_days < 1 or every < 2:
        raise KgmlPeftError("block_days must be >= 1 and every >= 2")
    day = np.arange(schema.DAYS_PER_YEAR)
    is_val = (day // block_days) % every == every - 1
    train = dataclasses.replace(windows, daily=np.where(is_val[None, :, None], np.nan, windows.daily))
    val = dataclasses.replace(windows, daily=np.where(is_val[None, :, None], windows.daily, np.nan),
                              annual=np.full_like(windows.annual, np.nan))
    return train, val
