"""Intermediate data that crosses step boundaries: blob format, object store, Kedro dataset."""
