"""Orchestration helpers the flows use: the local Prefect stack, the GTO registry, publishing,
the DVC helpers and the sweep's trial runner. Above the library: may import Prefect, DVC, GTO, Dask."""
