"""Runs over data sets: the resumable store, the process pool and the Dask executor."""
