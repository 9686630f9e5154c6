"""Evaluation: ``evav eval`` and ``evav generate`` (cli.py) over a loaded checkpoint (load.py).

samples.py reads and checks the split (bad samples are skipped, counted per reason), run.py
generates and reads answers in batches, readers.py reads each task kind, scores.py holds the
metrics, report.py writes the results JSON, report.md and the MLflow record.
"""
