"""Training: data, models, the loop, plots."""
