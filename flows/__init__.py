"""Prefect flows. Wiring only: every stage runs through DVC (``flows.dvc_stage``)."""
