"""Worker lifecycle: leave with the arbiter, and take connections only when they can be answered.

BentoML runs ``bentoml serve`` as a circus arbiter that owns the listening socket and forks one
process per worker (``RESDEPLOY_WORKERS``); every worker accepts from that one shared socket, and
circus puts each worker in a session of its own. Two gaps follow (issue #22, docs/design.md#serving):

* A SIGKILLed arbiter leaves its workers running with parent 1, still holding the port and the
  model's memory. :func:`core.parent.exit_with_parent` makes a worker leave on its own (uvicorn
  finishes the requests in flight on the SIGTERM it sends).
* A restarted worker accepts connections as soon as uvicorn starts, i.e. while its model loads, and
  answers them 503 although another worker is ready. :func:`accepts_before_ready` says when a worker
  should load its model *before* uvicorn starts accepting (uvicorn only calls ``accept`` once the
  ASGI lifespan start-up, where BentoML runs the service's start-up hooks, has finished); until then
  its share of connections stays in the kernel's accept queue for the workers that are ready.
"""

from __future__ import annotations



def accepts_before_ready(workers: int) -> bool:
    """Whether a worker takes connections while its model is still loading.

    One worker: yes, so ``/livez`` is 200 and ``/readyz`` 503 during the load and Kubernetes probes
    see a live, unready pod (today's behaviour). Several workers: no. A worker that is not ready
    leaves the shared socket to the ready ones; at a cold start, when none is ready yet, connections
    wait in the accept queue until the first model is loaded rather than being answered 503.
    """
    return workers <= 1
