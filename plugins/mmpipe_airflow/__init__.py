"""Airflow-facing glue for mmpipe: operators that adapt the library's CLI to Airflow tasks.

Kept apart from ``mmpipe/`` because the library never imports Airflow.
"""
