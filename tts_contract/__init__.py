"""The contract between whoever sends jobs (the `producer` client, `tts-backfill`, the HTTP gateway)
and the workers that run them; each side imports it, neither imports the other.

- `errors`: the exception tree, which failed jobs carry back through the result backend;
- `schema`: the request fields and their rules, checked before sending and again by the worker;
- `formats`: the output formats, their codecs, rates and bitrates;
- `names`: the task's name and the queues;
- `keys`: every Redis key the project names itself, and those of kombu's it reads.

Importing it imports neither torch, numpy, soundfile nor boto3.
"""
