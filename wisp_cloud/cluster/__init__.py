"""Many verifier replicas behind one endpoint, on Ray Serve (`wisp-cloud serve --replicas N`).

Each replica is a whole verifier (model, KV pool, scheduler, estimator: `replica.py`) and serves the usual
HTTP API itself through `server.create_app` (`app.py`), over its own service and, for what another replica
holds, the others through a deployment handle (`fleet.py`); a Ray Serve request router (`router.py`)
keeps every round of a session on the replica that holds its KV and places new sessions by each
replica's reported load (`placement.py`, pure). Nothing here is imported unless the cluster is asked for,
so one replica needs no Ray.
"""
