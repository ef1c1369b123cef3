"""torchrun (``python -m torch.distributed.run``) with a short grace for the ranks left after one has failed.

When a rank fails, torchrun sends the others SIGTERM and waits 30 seconds before SIGKILL, whatever
``--shutdown_timeout`` says: in torch 2.13 the process context that notices the failure closes the others with
``PContext.close``'s default timeout (the agent passes ``--shutdown_timeout`` when torchrun itself is signalled,
and again once the ranks are gone, too late to matter).
The ranks left are then blocked in a collective that can never complete (ZeRO-3 gathers every layer's weights
from all ranks), so they cannot act on the signal: the 30 s only delayed the error a user sees (measured: rank 0
of a two-process run was SIGKILLed 30 s after rank 1 had failed). The launcher ends the run FAILED itself once
torchrun returns. No torchrun option sets this grace, hence the changed default below. A signalled stop (Ctrl-C,
SIGTERM to the launcher) keeps its explicit timeout: there the ranks finish their step, save and end the run KILLED.
"""

from __future__ import annotations

# Seconds the ranks left get to exit on SIGTERM after another rank failed, before SIGKILL.
FAILED_PEER_GRACE_SECONDS = 5


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.distributed.run import main as torchrun

    close = PContext.close

    def close_after_a_failure(context, death_sig=None, timeout=FAILED_PEER_GRACE_SECONDS):
        return close(context, death_sig, timeout)

    PContext.close = close_after_a_failure
    torchrun()


if __name__ == "__main__":
    main()
