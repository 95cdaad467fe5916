"""prefsync's benchmark suite: simulators, RabbitMQ-backed services and load, with targets.

``prefsync bench [SCENARIO ...]`` (or ``python -m bench``) measures a raw broker ceiling on this
machine, runs the scenarios (backfill, steady, api-economy, rate-limited, memory, scale) as
separate processes against the real broker, and writes ``bench/results/latest.json`` and
``latest.md``. Every figure is a median over repeated runs.
"""
