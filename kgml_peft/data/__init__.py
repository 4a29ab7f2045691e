"""Tables, validation, year windows, scalers, splits and the synthetic demo data."""

from kgml_peft.data.tables import load_table, read_table, select_sites, validate_table, write_table
from kgml_peft.data.windows import (
    Scalers,
    WindowDataset,
    YearWindows,
    make_windows,
    split_by_site,
    split_by_year,
)

__all__ = [
    "Scalers", "WindowDataset", "YearWindows", "load_table", "make_windows", "read_table",
    "select_sites", "split_by_site", "split_by_year", "validate_table", "write_table",
]
