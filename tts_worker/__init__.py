"""The GPU worker of the text-to-speech queue: `celery -A tts_worker worker`.

Celery finds the app in `tts_worker.celery`; importing this package itself loads nothing heavy.
"""

import os

# The engines' libraries draw tqdm progress bars on stderr (IndexTTS2 one per segment, transformers
# one per model it loads), and a worker logs every redraw as a line of its own. tqdm reads
# TQDM_DISABLE once, when it is first imported: hence here, before anything of the worker imports it.
os.environ.setdefault("TQDM_DISABLE", "1")
