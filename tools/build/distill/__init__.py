"""Distilling a small student drafter from the target (teacher data, training, evaluation)."""
