"""Fencing replicas with generations: which ``deploy_replica`` and ``stop_replica`` commands
are stale (:func:`stale_reason`). The supervisor (:mod:`controller.agent.replicas`) keeps
the fences, one per replica, and raises them.

Fencing with generations
========================

A replica (deployment id, replica index) runs at most once per agent. Each carries
the generation of its assignment; the agent remembers, per replica, the highest
generation it accepted (its *fence*) and whether it was stopped at that generation:

* deploy with a generation above the fence → replaces whatever runs (stopped first);
* deploy with the same generation as a starting or running replica → the same
  replica (a retried command; no second process);
* deploy with the same generation as a failed one → started again (fresh directory);
* deploy below the fence, or at the generation a stop was received for →
  ``ok=False`` ``"stale generation …"`` (``error_kind`` ``stale_generation``);
* stop below the fence → ``ok=False`` ``"stale generation …"``; a stop at or above the
  fence stops the replica and raises the fence to it, so that a node coming back
  after its replica moved can be told to stop it, and a late deploy of the old
  assignment cannot start it again. Stopping what is not running is ``ok``.

Fences live in memory: after an agent restart nothing runs (see below), and the
controller's new stream carries new commands.
"""

from __future__ import annotations

from controller.agent.replica_spec import _Key

Fence = tuple[int, bool]
"""A replica's fence: the highest generation accepted, and whether it was stopped at it."""


def stale_reason(fence: Fence | None, key: _Key, generation: int, *, deploy: bool) -> str:
    """Why a deploy (``deploy=True``) or stop of replica ``key`` at ``generation`` is stale
    behind ``fence``; empty if it is not."""
    if fence is None:
        return ""
    fenced, stopped = fence
    name = f"{key[0]}/{key[1]}"
    if generation < fenced:
        return f"stale generation: replica {name} is at generation {fenced}, got {generation}"
    if deploy and stopped and generation == fenced:
        return f"stale generation: replica {name} was stopped at generation {fenced}"
    return ""
