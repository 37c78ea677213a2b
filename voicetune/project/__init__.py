"""The project as a whole: recipes that set params.yaml, and the preflight that checks
params.yaml and the files the pipeline reads before ``dvc repro`` runs.

Imports ``core`` and ``data``.
"""
