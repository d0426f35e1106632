"""Celery worker: runs the shared ml/ predictor on queued studies."""
