"""Which replica (runner) a new request goes to.

Prefix-aware, as llm-d's and vLLM production-stack's routers: the replica
whose prefix cache holds the longest prefix of the prompt wins; among equals
(no hit anywhere, typically) the least loaded, then the first. Replicas that
are down or whose waiting queue is full are skipped.
"""

from __future__ import annotations

from llmexec.errors import ResourceExhaustedError, UnavailableError
from llmexec.scheduler.replica import Replica
from llmexec.scheduler.sequence import Sequence


def choose_replica(replicas: list[Replica], seq: Sequence, num_new: int = 1, force: bool = False) -> Replica:
    """The replica for seq (and its num_new - 1 sibling completions).

    force: recovered sequences are never refused; they may go to a replica that
    is down (it will be waited for) when no replica is up."""
    candidates = [r for r in replicas if r.healthy]
    if not candidates:
        if force:
            candidates = list(replicas)
        else:
            raise UnavailableError("no runner is reachable; the scheduler is waiting for one to come back")
    if not force:
        with_room = [r for r in candidates if _has_room(r, num_new)]
        if not with_room:
            candidates[0].scheduler.check_room(num_new)  # raises with the queue's numbers
            raise ResourceExhaustedError("every runner's waiting queue is full; retry later")
        candidates = with_room
    best = max(
        enumerate(candidates),
        key=lambda ir: (len(ir[1].block_manager.computed_prefix(seq)), -ir[1].load, -ir[0]),
    )
    return best[1]


def _has_room(replica: Replica, num_new: int) -> bool:
    try:
        replica.scheduler.check_room(num_new)
    except ResourceExhaustedError:
        return False
    return True
