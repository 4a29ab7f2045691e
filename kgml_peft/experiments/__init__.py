"""Reports and figures (the paper's evaluation is built here)."""
