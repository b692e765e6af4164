#!/usr/bin/env python3
"""BatchNorm in a federation with conflicting scanners: where a T1 domain's Dice plateau comes from.

Trains the federation of a scenario (default ``scenarios/bn_conflict.yaml``: one inverted-contrast
scanner and two T1 scanners, no drift) with simlab's core only — the same
:class:`simlab.hospital.Hospital` objects and :func:`simlab.aggregation.aggregate` the ServerApp
calls, no Flower — four ways on identical streams:

- ``shared``: FedAvg over every state entry, BatchNorm weights and running statistics included;
  the deployed model is the global one;
- ``shared+adabn``: the same trained model, evaluated after its running statistics are re-estimated
  on each test set's own images (AdaBN, no labels, no weight changes);
- ``local``: FedBN (``federation.norm: local``): normalisation layers never leave a hospital; the
  model deployed at a hospital is the shared weights with that hospital's normalisation layers;
  a hospital is evaluated on its own domain with its own model;
- ``control``: the same as ``shared`` without the hospitals given by ``--leave-out`` (default the
  inverted-contrast one): what the others reach when nothing conflicts.

Printed per arm, hospital and evaluated round (mean ± std over seeds), each on the hospital's own
domain's test set: ``dice`` of the model as deployed (mean over foreground classes and images, MONAI
``DiceMetric`` as in a run's evaluation); ``dice+adabn``, the same weights with running statistics
re-estimated on the test images; ``dice pre-agg``, the hospital's own model as it left local training,
before aggregation; ``dice gap1`` and ``dice gap``, how far the deployed model's BatchNorm running
means are from the statistics of what actually reaches each BatchNorm layer on that domain
(|running mean − the inputs' mean| / the inputs' std, mean over channels; first layer, and mean over
all layers).

    tools/bn_probe.py [SCENARIO] [--seeds 0,1,2] [--rounds 15] [--every 5] [--leave-out st-mary]
                      [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from simlab.aggregation import aggregate  # noqa: E402
from simlab.hospital import Hospital  # noqa: E402
from simlab.metrics.segmentation import dice_per_class, predict  # noqa: E402
from simlab.models.norm import adapt_batchnorm, norm_state_keys  # noqa: E402
from simlab.models.unet import build_model, state_to_numpy, trainable_keys  # noqa: E402
from simlab.scenario.schema import load_scenario  # noqa: E402
from simlab.scenario.task import task_of  # noqa: E402
from simlab.seeding import derive_seed, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def dice(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    pred = predict(model, images, 64, "cpu")
    return float(dice_per_class(pred, torch.from_numpy(labels.astype(np.int64)), num_classes).mean())


def first_bn(model: torch.nn.Module) -> torch.nn.BatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def bn_gaps(model: torch.nn.Module, images: np.ndarray) -> tuple[float, float]:
    """|running mean − the domain's own mean| / the domain's own std of each BatchNorm layer's input,
    mean over channels: (first layer, mean over all layers). The inputs are those of the model as
    deployed (eval mode), so every layer sees what the layers before it actually output."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[int, torch.Tensor] = {}
    hooks = [bn.register_forward_hook(lambda m, inp, out, i=i: seen.setdefault(i, inp[0].detach()))
             for i, bn in enumerate(bns)]
    with torch.no_grad():
        model.eval()(torch.from_numpy(images))
    for hook in hooks:
        hook.remove()
    gaps = []
    for i, bn in enumerate(bns):
        x = seen[i].transpose(0, 1).reshape(bn.num_features, -1)
        gaps.append(float(((bn.running_mean - x.mean(1)).abs() / x.std(1).clamp_min(1e-6)).mean()))
    return gaps[0], float(np.mean(gaps))


def train(hospitals: dict[str, Hospital], state: dict, keys: set, local: set, t: int, private: dict,
          trained: dict) -> dict:
    """One FedAvg round over ``hospitals`` (in id order); ``private`` carries each hospital's own state,
    ``trained`` receives each hospital's model as it left local training (before aggregation)."""
    entries = []
    for h, hosp in hospitals.items():
        out = hosp.train(state, t, private.get(h, {}))
        private[h] = out.method_state
        trained[h] = out.state
        entries.append((h, out.state, int(out.metrics["num_examples"])))
    shared = {k: v for k, v in state.items() if k not in local}
    fed = next(iter(hospitals.values())).task.federation
    result = aggregate(entries, fed.aggregation, trainable_keys=keys - local, reference=shared)
    return {k: result.model.get(k, v) for k, v in state.items()}


def run_seed(path: str, seed: int, rounds: int, every: int, leave_out: list[str]) -> dict:
    arms = {"shared": [], "local": ["federation.norm=local"]}
    out: dict = {}
    tests = None
    for arm, sets in [*arms.items(), ("control", [])]:
        sc = load_scenario(path, [*sets, f"federation.rounds={rounds}"], seed=seed).base
        ids = [h.id for h in sc.hospitals if arm != "control" or h.id not in leave_out]
        hospitals = {h: Hospital(task_of(sc, h)) for h in ids}
        if tests is None:
            own = {h.id: h.drift.domain for h in sc.hospitals}
            tests = {h: Hospital(task_of(sc, h)).factory.test_set(own[h]) for h in own}
        torch.set_num_threads(1)
        seed_everything(derive_seed(sc.seed, "init"))
        model = build_model(sc.model, sc.num_classes)
        state, keys = state_to_numpy(model), trainable_keys(model)
        local = set(norm_state_keys(model)) if arm == "local" else set()
        private: dict = {}
        trained: dict = {}
        for t in range(1, rounds + 1):
            state = train(hospitals, state, keys, local, t, private, trained)
            if t % every:
                continue
            row = {}
            for h, hosp in hospitals.items():
                images, labels = tests[h]
                deployed = hosp.model(state, "cpu", private.get(h))
                row[h] = dice(deployed, images, labels, sc.num_classes)
                row[f"{h}+adabn"] = dice(adapt_batchnorm(deployed, images, 64, "cpu"), images, labels, sc.num_classes)
                row[f"{h} gap1"], row[f"{h} gap"] = bn_gaps(deployed, images)
                row[f"{h} pre-agg"] = dice(hosp.model(trained[h], "cpu", private.get(h)), images, labels,
                                           sc.num_classes)
            out.setdefault(arm, {})[t] = row
    return out


SUFFIXES = {"": "dice", "+adabn": "dice adabn", " pre-agg": "dice pre-agg", " gap1": "bn gap first",
            " gap": "bn gap all"}


def summarise(results: list[dict], rounds: list[int]) -> None:
    """Per arm, hospital and evaluated round: mean ± std over seeds of Dice as deployed, with AdaBN,
    of the hospital's own model before aggregation, and the BatchNorm gaps (first layer, all layers)."""
    hospitals = sorted({c for r in results for arm in r.values() for row in arm.values() for c in row if " " not in c
                        and "+" not in c})
    print(f"{'arm':8} {'hospital':9} {'round':>5} " + " ".join(f"{s:>13}" for s in SUFFIXES.values()))
    for arm in ("shared", "local", "control"):
        for h in hospitals:
            for t in rounds:
                cells = []
                for suffix in SUFFIXES:
                    vals = [r[arm][t][h + suffix] for r in results if h + suffix in r[arm].get(t, {})]
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    cells.append(f"{statistics.mean(vals):.3f}±{sd:.3f}" if vals else "")
                if any(cells):
                    print(f"{arm:8} {h:9} {t:>5} " + " ".join(f"{c:>13}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default=str(ROOT / "scenarios" / "bn_conflict.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--leave-out", default="st-mary", help="hospitals left out of the control federation")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [run_seed(args.scenario, s, args.rounds, args.every, args.leave_out.split(",")) for s in seeds]
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": seeds, "results": results}, indent=1))
    summarise(results, list(range(args.every, args.rounds + 1, args.every)))
    print(f"{len(seeds)} seeds in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
