"""Remaining-length prediction: data collection, heads, training, evaluation, serving hook."""
