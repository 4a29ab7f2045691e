"""kgml-peft: parameter-efficient site calibration of knowledge-guided carbon-flux models."""

__version__ = "0.1.0"
