"""Site calibration: the Eq. 2/3 training runs that fit adapters (:mod:`kgml_peft.tuners`) to sites
and regions, one unit at a time or many side by side."""
