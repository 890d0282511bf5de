"""SAAP-style structured pruning: whole attention heads and MLP channels removed, a smaller model written.

groups.py (which rows and columns fall together), importance.py (measures, fusion, stability) and
allocation.py (per-module amounts) are pure maths; calibration.py is the gradient pass, scoring.py the glue,
surgery.py the physical removal and output config, recovery.py the adapter fine-tuning, pipeline.py the job.
"""
