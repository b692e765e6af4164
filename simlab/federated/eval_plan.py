"""Who evaluates which test domain when the deployed model is the same at every hospital.

A model deployed identically everywhere (the shared global model, with or without AdaBN, or the
routed ODEx pool) scores a domain's test set the same wherever it runs: the test set depends on the
domain and the seed only. Each domain is therefore evaluated once per evaluation round, by one
hospital, and evaluation costs grow with the number of domains, not with hospitals × domains.

The assignment is a pure function of the scenario (the same in every round, in simulation and in a
deployment, and after a resume): a domain goes to a hospital whose own stream reads it (in a
deployment a real dataset's images are at its owner's node), and among those to the one with the
fewest domains so far, so that evaluators run side by side with balanced work; a domain no stream
reads (tested only) goes to the least-loaded hospital. Domains with fewer owners are placed first,
so a domain only one hospital holds is not crowded out; ties go to the earlier domain and the
earlier hospital.
"""

from __future__ import annotations


def assign_evaluators(domains: list[str], streams: dict[str, list[str]]) -> dict[str, list[str]]:
    """Evaluator → its domains (in ``domains`` order), evaluators in ``streams`` order; ``streams``:
    every hospital (in hospital order) → the domains its own stream reads. Hospitals that evaluate
    nothing are left out: they are not contacted."""
    hospitals = list(streams)
    if not hospitals:
        return {}
    owners = {d: [h for h in hospitals if d in streams[h]] for d in domains}
    load = {h: 0 for h in hospitals}
    chosen: dict[str, str] = {}
    owned = [d for d in domains if owners[d]]
    for d in sorted(owned, key=lambda d: (len(owners[d]), domains.index(d))):
        chosen[d] = min(owners[d], key=lambda h: (load[h], hospitals.index(h)))
        load[chosen[d]] += 1
    for d in (d for d in domains if not owners[d]):
        chosen[d] = min(hospitals, key=lambda h: (load[h], hospitals.index(h)))
        load[chosen[d]] += 1
    return {h: [d for d in domains if chosen.get(d) == h] for h in hospitals if load[h]}
