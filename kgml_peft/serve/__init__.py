"""Serving: one backbone, many adapters, hot-swapped per request, mixed-site batches."""
