"""The compute side of idforge: the Celery app, thin named tasks, and the pipeline they call."""
