"""The rollout engine: per-device steps, waves, admission under max_in_flight, and the reconciler.

A device update moves through the steps ``offer → install → finalize``. Each step is a Celery task
that acts on a batch of device updates (a Celery message costs milliseconds of CPU, far more than a
device's share of a batched step). Where a device is in its chain is its state in SQL: the party
whose compare-and-set moves a row on (a worker step, ingest on a report, the reconciler on a
timeout) sends the next step; a step that was lost (worker killed, Redis flushed) is sent again by
the reconciler once the row has not moved for a few seconds. Every step is idempotent per
(update, attempt, step), so a repeated step changes nothing twice.

Other processes reach the engine only through :mod:`orchestrator.engine.client` (send a nudge) and
:mod:`orchestrator.engine.dispatch` (send steps by name). The Celery application itself is built
only in worker and beat processes (:mod:`orchestrator.worker`).
"""
