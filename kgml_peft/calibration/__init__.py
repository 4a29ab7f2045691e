"""Site calibration: adapters (LoRA + bottleneck blocks + head) and the Eq. 2/3 training runs."""
