"""Scaling laws: ladders of small runs (ladder.py), law fits (fit.py, report.py), the budget planner (planner.py).

Modules import torch only inside the functions that train or time models, so fitting is cheap.
"""
