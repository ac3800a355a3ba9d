"""The GPU worker of the text-to-speech queue: `celery -A tts_worker worker`.

Celery finds the app in `tts_worker.celery`; importing this package itself loads nothing heavy.
"""
