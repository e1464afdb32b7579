"""`python -m bench.quality`: image quality of the schedules (see __main__.py)."""
