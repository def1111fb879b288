"""Plumbing: errors, run statuses, the typed params, files and storage, progress, MLflow."""
