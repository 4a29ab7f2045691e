"""Which flux-tower file is which: product, site and resolution from the file name.

Four wrappers of the same ONEFlux columns are read (see docs/fluxnet.md for the table):

==========================  =================================================================  ============
product                     file name                                                          resolutions
==========================  =================================================================  ============
FLUXNET2015                 ``FLX_<site>_FLUXNET2015_<FULLSET|SUBSET>_<res>_<years>_<v>.csv``  DD, HH, HR
AmeriFlux FLUXNET           ``AMF_<site>_FLUXNET_<FULLSET|SUBSET>_<res>_<years>_<v>.csv``      DD, HH, HR
ICOS ETC L2 FLUXNET         ``ICOSETC_<site>_FLUXNET_<res>[_INTERIM]_L2.csv``                  DD, HH, HR
FLUXNET (ONEFlux v1.3+)     ``<network>_<site>_FLUXNET_FLUXMET_<res>_<years>_<v>_<r>.csv``     DD, HH, HR
==========================  =================================================================  ============

(and the daily aggregates in ../shared, ``FLX_<site>_FLUXNET2015_DD-FROM-HH_<years>.csv``). In the
newest FLUXNET release ``HH`` means half-hourly *or* hourly; the records say which. Names are
matched in the spelling downloads have (a renamed ``amf_us-ne1_...`` would change the site id).
The name decides; files that sit next to these in a download (weekly, monthly and yearly files,
ERA reanalysis, auxiliary and metadata files, AmeriFlux BASE and ICOS non-FLUXNET files, zip
archives) are refused with a line saying what the file is and what to import instead. A folder
yields one file per site: the half-hourly or hourly one where the download also has the daily
one, because only sub-daily records give the daily minimum and maximum that the tower backbones
use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kgml_peft import schema
from kgml_peft.errors import KgmlPeftError
from kgml_peft.readable import check_regular_file

#: Resolutions a file name can carry, and how the messages name them (``SD``: the newest
#: FLUXNET release's ``HH``, half-hourly or hourly, which the records decide).
RESOLUTIONS = {"HH": "half-hourly", "HR": "hourly", "SD": "half-hourly or hourly", "DD": "daily",
               "WW": "weekly", "MM": "monthly", "YY": "yearly"}
#: The resolutions import reads.
READ = ("DD", "HH", "HR")
SUB_DAILY = ("HH", "HR", "SD")

_SITE = r"(?P<site>[A-Za-z0-9]{2}-[A-Za-z0-9]{3})"
_FLX = re.compile(rf"^FLX_{_SITE}_(?P<product>[A-Za-z0-9-]+)_(?P<rest>.+)$")
_FLUXMET = re.compile(rf"^(?P<network>[A-Z]+)_{_SITE}_FLUXNET_(?P<kind>FLUXMET|ERA5|BIFVARINFO|BIF)"
                      r"(?P<rest>_.*_v\d+\.\d+_r\d+)$")
_AMF = re.compile(rf"^AMF_{_SITE}_(?P<rest>.+)$")
_ICOS = re.compile(rf"^ICOSETC_{_SITE}_(?P<rest>.+)$")
_PATTERNS = (_FLX, _FLUXMET, _AMF, _ICOS)

_NAMES = ("FLX_<site>_FLUXNET2015_<FULLSET|SUBSET>_<DD|HH|HR>_<years>_<version>.csv, "
          "AMF_<site>_FLUXNET_<FULLSET|SUBSET>_<DD|HH|HR>_<years>_<version>.csv, "
          "ICOSETC_<site>_FLUXNET_<DD|HH>_L2.csv or <network>_<site>_FLUXNET_FLUXMET_<DD|HH>_<years>_<v>_<r>.csv")
_READS = "import reads the daily (DD), half-hourly (HH) or hourly (HR) FULLSET or SUBSET file"


@dataclass(frozen=True)
class FluxFile:
    """One flux-tower file import can read: where it is, its site, product and resolution."""

    path: Path
    site: str
    #: ``FLUXNET2015``, ``AmeriFlux FLUXNET``, ``ICOS ETC L2`` or ``FLUXNET FLUXMET``
    product: str
    #: ``FULLSET``, ``SUBSET`` or ``""`` (ICOS, FLUXMET and the ../shared daily aggregates have none)
    grouping: str
    #: ``DD``, ``HH``, ``HR`` or ``SD`` (half-hourly or hourly: the records say which)
    resolution: str
    #: the network that processed a FLUXMET file (``AMF``, ``ICOSETC``, ``EUF``, ...); else ``""``
    network: str = ""

    @property
    def sub_daily(self) -> bool:
        """Whether the records are half-hourly or hourly (aggregated to days on import)."""
        return self.resolution in SUB_DAILY

    @property
    def label(self) -> str:
        """How messages and reports name the file's kind, e.g. ``AmeriFlux FLUXNET FULLSET, hourly``."""
        product = f"{self.product} {self.grouping}" if self.grouping else self.product
        network = f" ({self.network})" if self.network else ""
        return f"{product}{network}, {RESOLUTIONS[self.resolution]}"


def _refuse(name: str, what: str, instead: str) -> KgmlPeftError:
    return KgmlPeftError(f"{name} is {what}; {instead}")


def _resolution(name: str, res: str, what: str, site: str) -> str:
    """The resolution token of a data file name; weekly, monthly and yearly files are refused."""
    if res not in RESOLUTIONS or res == "SD":
        raise KgmlPeftError(f"{name}: {res!r} is not a resolution (HH, HR, DD, WW, MM, YY); "
                            f"expected {_NAMES}")
    if res not in READ:
        raise _refuse(name, f"a {RESOLUTIONS[res]} {what} file",
                      f"{_READS} of site {site} from the same download")
    return res


#: Files of a ONEFlux download that hold no tower fluxes, by their grouping token.
_NOT_FLUXES = {"ERAI": "an ERA-Interim meteorology file (reanalysis weather, no fluxes)",
               "ERA5": "an ERA5 meteorology file (reanalysis weather for the site, no fluxes)",
               "AUXMETEO": "an auxiliary meteorology file (downscaling statistics)",
               "AUXNEE": "an auxiliary NEE file (USTAR and partitioning statistics)"}


def _grouping(name: str, site: str, product: str, tokens: list[str], prefix: str) -> tuple[str, str, str]:
    """``<FULLSET|SUBSET>_<res>_...`` of a FLUXNET2015 or AmeriFlux FLUXNET name (``tokens``);
    reanalysis and auxiliary files are refused. ``prefix``: the name up to the grouping."""
    grouping = tokens[0] if tokens else ""
    if grouping in ("FULLSET", "SUBSET"):
        if len(tokens) < 2:
            raise KgmlPeftError(f"{name}: no resolution in the name; expected {_NAMES}")
        return product, grouping, _resolution(name, tokens[1], product, site)
    if grouping in _NOT_FLUXES:
        raise _refuse(name, f"{_NOT_FLUXES[grouping]} of {product}", f"{_READS} ({prefix}_FULLSET_...)")
    raise KgmlPeftError(f"{name}: unknown {product} file kind {grouping!r}; expected {_NAMES}")


def _fluxnet2015(name: str, site: str, product: str, rest: str) -> tuple[str, str, str]:
    if product == "FLUXNET-CH4":
        raise _refuse(name, "a FLUXNET-CH4 file (methane synthesis, no VUT NEE and partitioned GPP "
                            "columns)", f"download the FLUXNET2015 or AmeriFlux FLUXNET FULLSET files of {site}")
    if product != "FLUXNET2015":
        raise KgmlPeftError(f"{name}: unknown FLUXNET product {product!r}; expected {_NAMES}")
    tokens = rest.split("_")
    if tokens[0].startswith("DD-FROM-"):  # the daily aggregates in ../shared
        return "FLUXNET2015", "", "DD"
    return _grouping(name, site, "FLUXNET2015", tokens, f"FLX_{site}_FLUXNET2015")


def _ameriflux(name: str, site: str, rest: str) -> tuple[str, str, str]:
    tokens = rest.split("_")
    first = tokens[0]
    fluxnet = f"download the AmeriFlux FLUXNET product of {site} (AMF_{site}_FLUXNET_FULLSET_...zip)"
    if first == "BASE":
        raise _refuse(name, "an AmeriFlux BASE file (measured half-hours, not gap-filled and not "
                            "partitioned: no NEE_VUT_REF, GPP or RECO)", f"{fluxnet} instead")
    if first in ("BASE-BADM", "BIF", "BADM"):
        raise _refuse(name, "AmeriFlux site metadata (BADM), not flux data",
                      f"{fluxnet}; give coordinates with --site-meta")
    if first != "FLUXNET":
        raise KgmlPeftError(f"{name}: unknown AmeriFlux file kind; expected {_NAMES}")
    return _grouping(name, site, "AmeriFlux FLUXNET", tokens[1:], f"AMF_{site}_FLUXNET")


def _icos(name: str, site: str, rest: str) -> tuple[str, str, str]:
    tokens = rest.split("_")
    first = tokens[0]
    instead = f"import ICOSETC_{site}_FLUXNET_DD_L2.csv or ICOSETC_{site}_FLUXNET_HH_L2.csv from the same archive"
    if first == "FLUXNET" and tokens[2:] in (["L2"], ["INTERIM", "L2"]):
        return "ICOS ETC L2", "", _resolution(name, tokens[1], "ICOS ETC L2 FLUXNET", site)
    if first in ("VARINFO", "SITEINFO", "ANCILLARY", "INST"):
        raise _refuse(name, f"ICOS ETC metadata ({first}), not flux data", instead)
    if first in ("FLUXES", "METEO", "METEOSENS", "ARCHIVE"):
        raise _refuse(name, f"an ICOS ETC L2 {first} file (not the ONEFlux FLUXNET product: no "
                            "gap-filled, partitioned GPP and RECO)", instead)
    raise KgmlPeftError(f"{name}: unknown ICOS ETC file kind; expected {_NAMES}")


def _fluxmet(name: str, site: str, network: str, kind: str, rest: str) -> tuple[str, str, str]:
    """The newest FLUXNET release: ``<network>_<site>_FLUXNET_FLUXMET_<res>_<years>_<v>_<r>``."""
    instead = f"import {network}_{site}_FLUXNET_FLUXMET_HH_... (or _DD_) from the same download"
    if kind == "ERA5":
        raise _refuse(name, f"{_NOT_FLUXES[kind]} of the FLUXNET release", instead)
    if kind != "FLUXMET":
        raise _refuse(name, f"FLUXNET {'variable ' if kind == 'BIFVARINFO' else ''}metadata ({kind}), "
                            "not flux data", f"{instead}; give coordinates with --site-meta")
    tokens = rest.split("_")[1:]
    if not tokens:
        raise KgmlPeftError(f"{name}: no resolution in the name; expected {_NAMES}")
    res = "SD" if tokens[0] == "HH" else _resolution(name, tokens[0], "FLUXNET FLUXMET", site)
    return "FLUXNET FLUXMET", "", res


def _match(stem: str) -> re.Match | None:
    """The first product pattern a file name's stem matches (spelled as downloads are)."""
    return next((m for m in (p.match(stem) for p in _PATTERNS) if m), None)


def identify(path: str | os.PathLike) -> FluxFile:
    """What a flux file is, from its name: product, site id and resolution. Names of other files
    (or of kinds import cannot use) are refused with one line that says what to import instead."""
    path = Path(path)
    name = path.name
    if name.lower().endswith(".zip"):
        raise _refuse(name, "a zip archive", "unzip it and import the folder (or its daily, "
                                             "half-hourly or hourly .csv file)")
    if not name.lower().endswith(".csv"):
        raise KgmlPeftError(f"{name}: flux-tower files are .csv ({_NAMES})")
    stem = name[:-4]
    match = _match(stem)
    if match is None or not name.endswith(".csv"):
        if any(re.match(p.pattern, stem, re.IGNORECASE) for p in _PATTERNS):
            raise KgmlPeftError(f"{name}: not spelled as downloads are (e.g. AMF_US-Ne1_FLUXNET_FULLSET_HH_"
                                "..., upper case); keep the name the file was downloaded with: the "
                                "site id is read from it literally")
        raise KgmlPeftError(f"{name}: not a FLUXNET file name; expected {_NAMES} (the name gives the "
                            "site, product and resolution: keep the name the file was downloaded with)")
    site = schema.check_site_id(match["site"])
    network = ""
    if match.re is _FLX:
        product, grouping, res = _fluxnet2015(name, site, match["product"], match["rest"])
    elif match.re is _FLUXMET:
        network = match["network"]
        product, grouping, res = _fluxmet(name, site, network, match["kind"], match["rest"] or "")
    elif match.re is _AMF:
        product, grouping, res = _ameriflux(name, site, match["rest"])
    else:
        product, grouping, res = _icos(name, site, match["rest"])
    return FluxFile(path, site, product, grouping, res, network)


def site_in_name(name: str) -> str | None:
    """The site id a flux file name carries (whatever the file is), or None."""
    match = _match(name.rsplit(".", 1)[0])
    return match["site"] if match else None


def _from_folder(folder: Path) -> list[FluxFile]:
    """The data files of a folder, one per site (sub-daily over daily of the same product). Files
    of a site that also has a data file (weekly, monthly, ERA... of the same download) are
    skipped; a site with only such files is refused with its first file's line, so no site named
    in the folder is left out without a word. Subfolders are not searched."""
    found: dict[str, list[FluxFile]] = {}
    refused: dict[str, str] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.lower().endswith((".csv", ".zip")):
            continue
        try:
            flux = identify(path)
        except KgmlPeftError as exc:
            site = site_in_name(path.name)
            refused.setdefault(site or "", str(exc))
            continue
        found.setdefault(flux.site.upper(), []).append(flux)
    lost = [site for site in refused if site and site.upper() not in found]
    if lost:
        raise KgmlPeftError(f"{folder}: no file of site {lost[0]} can be imported: {refused[lost[0]]}")
    if not found:
        subfolders = sum(1 for p in folder.iterdir() if p.is_dir())
        hint = (f"; its {subfolders} subfolders are not searched: give them as paths (e.g. {folder}/*/)"
                if subfolders else "")
        why = f" (such as: {next(iter(refused.values()))})" if refused else f" ({_NAMES})"
        raise KgmlPeftError(f"{folder} has no FLUXNET daily, half-hourly or hourly files{why}{hint}")
    chosen = []
    for files in found.values():
        other = [f for f in files if (f.product, f.grouping, f.network, f.site) !=
                 (files[0].product, files[0].grouping, files[0].network, files[0].site)]
        if other:
            raise _mixed(files[0], other[0])
        sub = [f for f in files if f.sub_daily]
        if len(sub) > 1 or (not sub and len(files) > 1):
            raise KgmlPeftError(f"{folder} has {len(sub) or len(files)} files of site {files[0].site} at "
                                f"the same level ({', '.join(f.path.name for f in (sub or files))}); keep one")
        chosen.append(sub[0] if sub else files[0])
    for flux in chosen:  # a FIFO named like a data file would block the import for ever
        check_regular_file(flux.path, "FLUXNET file")
    return chosen


def _mixed(a: FluxFile, b: FluxFile) -> KgmlPeftError:
    """Two files of one site: which they are, and which one to keep."""
    if a.site != b.site:
        return KgmlPeftError(f"sites {a.site} ({a.path.name}) and {b.site} ({b.path.name}) differ only "
                             "in case; FLUXNET site ids are unique whatever the case: keep one file, "
                             "named as it was downloaded")
    if (a.product, a.network) != (b.product, b.network):
        advice = ("import one product per site (AmeriFlux FLUXNET, ICOS L2 and the newer FLUXNET "
                  "release run the same ONEFlux processing as FLUXNET2015 on newer site data and "
                  "cover later years)")
    elif a.grouping != b.grouping:
        advice = ("keep one of the two sets (SUBSET has every column import reads; prefer the "
                  "half-hourly or hourly file)")
    elif a.sub_daily != b.sub_daily:
        advice = ("give one of them (the half-hourly or hourly file also gives the daily minimum "
                  "and maximum temperature and VPD)")
    else:
        advice = "give one of them"
    return KgmlPeftError(f"site {a.site} is in two files: {a.path.name} ({a.label}) and {b.path.name} "
                         f"({b.label}); {advice}")


def expand_paths(paths: Iterable[str | os.PathLike | FluxFile]) -> list[FluxFile]:
    """The files to import, identified: each path itself, or a folder's data files (one per site,
    see :func:`_from_folder`); a :class:`FluxFile` is taken as it is. A site in two files is
    refused, saying which they are."""
    files: list[FluxFile] = []
    for raw in paths:
        if isinstance(raw, FluxFile):
            files.append(raw)
            continue
        path = Path(raw)
        if path.is_dir():
            files.extend(_from_folder(path))
        else:
            check_regular_file(path, "FLUXNET file")  # before its name: a missing file is missing
            files.append(identify(path))
    if not files:
        raise KgmlPeftError("no FLUXNET files given")
    seen: dict[str, FluxFile] = {}
    for flux in files:
        if flux.site.upper() in seen:
            raise _mixed(seen[flux.site.upper()], flux)
        seen[flux.site.upper()] = flux
    return files
