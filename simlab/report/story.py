"""One paragraph that says what happened in a run: who changed, what each arm kept or lost.

Read from ``summary.json`` and the resolved scenario only (no rows): the hospitals whose streams
change (their drift, in words), the domains that left every stream and when, and per arm the Dice
it kept or lost on those domains (the headline forgetting's per-domain terms,
``forgetting_by_domain``), its final Dice on the domains still in use, and the size of its model
pool. The report puts it on its first screen; ``simlab run`` prints it under the table.
"""

from __future__ import annotations

from simlab.data.drift import describe
from simlab.rundir import reference_label

KEPT = 0.02  # a change of at most this much Dice is reported as "kept"


def _change(h: dict) -> str | None:
    """``st-mary: legacy_t2, then st-mary_t1 from round 11`` (the drift type's own words), or None for
    a hospital that keeps its domain."""
    d = h.get("drift") or {}
    return None if d.get("type", "none") == "none" else f"{h['id']}: {describe(d)}"


def _arm_sentence(name: str, a: dict) -> str:
    ref = reference_label(a)
    who = f"{name} [{ref}]" if ref else name
    parts = []
    for dom, f in (a.get("forgetting_by_domain") or {}).items():
        loss = f.get("forgetting")
        if loss is None:
            parts.append(f"has no reading on {dom}")
        elif abs(loss) <= KEPT:
            parts.append(f"kept {dom} ({f['then']:.2f} → {f['final']:.2f})")
        elif loss > 0:
            parts.append(f"lost {loss:.2f} Dice on {dom} ({f['then']:.2f} → {f['final']:.2f})")
        else:
            parts.append(f"gained {-loss:.2f} on {dom} ({f['then']:.2f} → {f['final']:.2f})")
    departed = set(a.get("forgetting_by_domain") or {})
    current = [v for d, v in (a.get("final_dice") or {}).items() if d not in departed and v is not None]
    if current:
        parts.append(f"ended at Dice {sum(current) / len(current):.2f} on the other test domains")
    pool = (a.get("pool") or {}).get("pool_size_final")
    if pool:
        parts.append(f"grew a pool of {pool} models")
    return f"{who} " + (", ".join(parts) if parts else "has no results")


def what_happened(summary: dict, scenario: dict) -> str:
    """The paragraph, plain text."""
    hospitals = scenario.get("hospitals") or []
    changes = [c for c in (_change(h) for h in hospitals) if c]
    still = [h["id"] for h in hospitals if _change(h) is None]
    text = "; ".join(changes) if changes else "No hospital's data changed"
    if still:
        text += f"; {', '.join(still)} kept {'its' if len(still) == 1 else 'their'} domain"
    text += "."
    arms = summary.get("arms") or {}
    first = next(iter(arms.values()), {})
    left = first.get("forgetting_by_domain") or {}
    if left:
        text += " " + "; ".join(f"{d} left every stream after round {f['last_trained_round']}" for d, f in left.items())
        text += " (no hospital trains on it after that, its test set is still scored)."
    else:
        text += f" {first.get('forgetting_note') or 'No domain left every stream'}."
    text += " " + "; ".join(_arm_sentence(n, a) for n, a in arms.items()) + "."
    return text
