"""Datasets: raw data to the prepared format, and minibatches of it."""
