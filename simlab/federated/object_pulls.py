"""Shorter back-off when Flower waits for a message's arrays, in the modules where simlab runs
Flower's own code: the ServerApp's grid (``flwr.superlink.grid.http_grid``), the SuperNode's loop
(``flwr.supernode.start_client_internal``, :mod:`simlab.engine.supernode`) and the ClientApp's task
(``flwr.supernode.runtime.run_clientapp``, :mod:`simlab.engine.clientapp_worker`).

A message travels as its metadata first and its arrays (Flower's objects) after, each pushed in a
request of its own, and the other side, which polls for messages, usually sees the metadata while the
arrays are still on their way. Flower 1.41 then retries each missing array after 1 s, doubling up to
10 s (``flwr.supercore.inflatable.inflatable_utils``): about one second lost at every hop of every
message, two hops each way (ServerApp → SuperLink → SuperNode → ClientApp and back), where the arrays
of a small model arrive within milliseconds. Here the retries start at 0.02 s and double up to 0.5 s;
Flower's limits on the whole wait (2 hours) and on the tries per array (500, now about 4 minutes per
array) stay. The module keeps Flower's function under the same name, with these two keywords bound.
"""

from __future__ import annotations

import functools
from types import ModuleType

from flwr.supercore.inflatable import inflatable_utils

INITIAL_BACKOFF_S = 0.02
BACKOFF_CAP_S = 0.5
PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")
"""Flower's functions that wait for arrays; a module is changed where it imported one by name."""


def quick_object_pulls(module: ModuleType) -> list[str]:
    """Bind the shorter back-off into every function of :data:`PULLS` that ``module`` imported; returns
    their names (an empty list means this Flower no longer imports them there)."""
    done = []
    for name in PULLS:
        if getattr(module, name, None) is not None:
            setattr(module, name, functools.partial(getattr(inflatable_utils, name),
                                                    initial_backoff=INITIAL_BACKOFF_S, backoff_cap=BACKOFF_CAP_S))
            done.append(name)
    return done
