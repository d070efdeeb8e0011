"""Talaria: per-op cost table, device profiles, roofline estimates, quality predictor, what-if plans (see ops.py)."""
