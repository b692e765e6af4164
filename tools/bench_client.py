#!/usr/bin/env python3
"""Client-side cost of one hospital round on one device (CPU or a GPU), with simlab's core code only.

Times, per hospital and round, the work a hospital's ClientApp does, calling the same object it calls
(:class:`simlab.hospital.Hospital`):

- **train**: local training of the scenario's MONAI U-Net on the hospital's labelled window
  (:meth:`Hospital.train`, ``--steps`` Adam steps of ``--batch`` images, the received model built
  and loaded first and read back after, as for a message);
- **train+aug**: the same with FedDG frequency-space augmentation (a
  :class:`~simlab.augment.frequency.FrequencyAugmenter` over the amplitude blocks every hospital
  shares, :func:`~simlab.augment.frequency.make_bank_entries`); ``--episodic`` takes FedDG's
  episodic step instead of the plain one;
- **odex score**: ODEx shift scoring of the window against a pool history (``--members`` members
  of ``--entries`` entries each, every entry with first-block weights of its own):
  :meth:`Hospital.window_decision`;
- **odex entry**: the statistics of the window that the hospital sends back with its update
  (:meth:`Hospital.window_entry`);
- **eval**: prediction and per-class Dice on every domain's test set (:meth:`Hospital.evaluate`).

Data are real phantom windows and test sets (:class:`~simlab.data.streams.DataFactory`), made once
beforehand (not timed) in ``--cache-dir`` (default: a temporary folder, removed at the end). After one untimed warm-up of every phase each phase is timed
``--repeats`` times for every hospital; the device is synchronised before a clock starts and
before it stops. Reported: medians (and ranges) over all hospitals and repeats; the augmentation
overhead (train+aug / train); the ODEx share of a training round (score + entry over score +
entry + train) and of an evaluated round (+ eval); and, for many virtual hospitals sharing one
device, the wall time of all hospitals' training one after another against the same training in
one Python thread per hospital (own model, data and, on CUDA, own CUDA stream), started together:
ratio concurrent / sequential (1 = no gain, 1/N = perfect overlap). On CUDA also the peak memory
allocated per hospital and phase, above what was allocated before it
(``torch.cuda.max_memory_allocated``).

Like the ClientApp, torch runs with deterministic algorithms (warn only) unless
``--no-deterministic``. Flower and Ray must not be imported: the script checks at the end and
fails if they were.

    tools/bench_client.py [--device auto|cpu|cuda] [--hospitals 3] [--size 128] [--steps 8]
                          [--batch 16] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_probes import federation_imported  # noqa: E402
from simlab.continual.odex_features import first_block_keys  # noqa: E402
from simlab.continual.training import pick_device  # noqa: E402
from simlab.hospital import Hospital  # noqa: E402
from simlab.models.unet import build_model, state_to_numpy  # noqa: E402
from simlab.scenario.schema import Scenario, load_scenario_dict  # noqa: E402
from simlab.scenario.task import task_of  # noqa: E402
from simlab.seeding import derive_seed, seed_everything  # noqa: E402

PHASES = ("train", "train+aug", "odex score", "odex entry", "eval")


def scenario(args, cache_dir: str) -> Scenario:
    """Hospitals alternate between two scanners; each changes scanner in the timed round, the one
    after the rounds that fill the pool history."""
    timed = args.entries + 1
    raw = {
        "name": "bench-client", "seed": args.seed,
        "data": {"image_size": args.size, "cache_dir": cache_dir},
        "domains": {"A": {"scanner": {"bias_field": 0.2, "noise": 0.02}},
                    "B": {"scanner": {"contrast": "inverted", "bias_field": 0.3, "noise": 0.03}}},
        "hospitals": [{"id": f"h{i}", "size": args.window,
                       "drift": {"type": "abrupt", "domains": ["AB"[i % 2], "AB"[(i + 1) % 2]], "at": [timed]}}
                      for i in range(args.hospitals)],
        "federation": {"rounds": timed, "local_steps": args.steps, "batch_size": args.batch, "lr": 0.002},
        "augmentation": {"frequency": {"enabled": True, "episodic": args.episodic}},
        "evaluation": {"test_size": args.test_size},
        "engine": {"device": args.device, "deterministic": args.deterministic},
    }
    return load_scenario_dict(raw, "<bench-client>").base


class Device:
    """The chosen device, with synchronisation and peak-memory bookkeeping (CUDA only)."""

    def __init__(self, name: str):
        self.name = name
        self.cuda = name == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self) -> int:
        """Start a peak-memory window; returns the bytes allocated now."""
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_since(self, base: int) -> int:
        if not self.cuda:
            return 0
        self.sync()
        return torch.cuda.max_memory_allocated() - base

    def describe(self) -> str:
        if self.cuda:
            return f"cuda [{torch.cuda.get_device_name()}]"
        return f"cpu [{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads]"


class Bench:
    """Everything one hospital round needs, prepared once; one method per timed phase. Each phase is
    a call of :class:`simlab.hospital.Hospital`, the object the ClientApp calls for every message."""

    def __init__(self, sc: Scenario, args, dev: Device):
        self.sc, self.args, self.dev = sc, args, dev
        self.t = sc.federation.rounds  # the timed round
        self.hospitals = [Hospital(task_of(sc, h.id)) for h in sc.hospitals]
        seed_everything(derive_seed(sc.seed, "init"))
        self.state = state_to_numpy(build_model(sc.model, sc.num_classes))
        self.odex = sc.continual.odex

    # -------------------------------------------------------------- data and pool, untimed
    def prepare(self) -> float:
        """Windows of every round and the test sets, made (and cached) now; the pool history; the
        amplitude bank. Returns the seconds taken."""
        start = time.perf_counter()
        for h in self.hospitals:
            for r in range(1, self.t + 1):
                h.stream.window(r)
            h.test_sets()
        self.histories = self._histories()
        self.bank = {h.id: h.amplitudes(self.t) for h in self.hospitals}
        return time.perf_counter() - start

    def _histories(self) -> dict:
        """``--members`` members, each with ``--entries`` entries: the statistics of earlier windows
        (one per round, hospitals taking turns) under first-block weights of the member's own."""
        sample = torch.zeros(1, 1, self.sc.data.image_size, self.sc.data.image_size)
        keys = first_block_keys(build_model(self.sc.model, self.sc.num_classes), self.odex.features, sample)
        histories = {}
        for m in range(self.args.members):
            entries = []
            for e in range(self.args.entries):
                torch.manual_seed(derive_seed(self.sc.seed, "member", m, e))
                model = build_model(self.sc.model, self.sc.num_classes)
                fb = {k: v for k, v in state_to_numpy(model).items() if k in keys}
                entry = self.hospitals[(m + e) % len(self.hospitals)].window_entry(model, e + 1, "cpu")
                entries.append(dataclasses.replace(entry, first_block=fb))
            histories[m] = entries
        return histories

    # -------------------------------------------------------------- timed phases
    def _timed(self, call) -> float:
        self.dev.sync()
        start = time.perf_counter()
        call()
        self.dev.sync()
        return time.perf_counter() - start

    def train(self, i: int, augment: bool) -> float:
        """One local update (the received model built and loaded, trained, read back)."""
        return self._timed(lambda: self.hospitals[i].train(self.state, self.t, {}, self.bank if augment else None))

    def score(self, i: int) -> float:
        """The window's scores under every member's history and the member they pick."""
        return self._timed(lambda: self.hospitals[i].window_decision(self.histories, self.t))

    def entry(self, i: int) -> float:
        """Statistics of the window under the received model's first block."""
        model = self.hospitals[i].model(self.state, self.dev.name)
        return self._timed(lambda: self.hospitals[i].window_entry(model, self.t, self.dev.name))

    def evaluate(self, i: int) -> float:
        """Prediction and per-class Dice on every domain's test set."""
        return self._timed(lambda: self.hospitals[i].evaluate(self.state))

    def run_phase(self, phase: str, i: int) -> tuple[float, int]:
        """Seconds of one phase for hospital ``i`` and, on CUDA, its peak memory above the start."""
        base = self.dev.mark()
        if phase == "train":
            s = self.train(i, False)
        elif phase == "train+aug":
            s = self.train(i, True)
        elif phase == "odex score":
            s = self.score(i)
        elif phase == "odex entry":
            s = self.entry(i)
        else:
            s = self.evaluate(i)
        return s, self.dev.peak_since(base)

    # -------------------------------------------------------------- many hospitals, one device
    def all_training(self, concurrent: bool) -> tuple[float, int]:
        """Wall time of every hospital's (plain) training, one after another or one thread each
        (on CUDA, each in its own stream). Returns seconds and peak memory above the start."""
        n = len(self.hospitals)
        base = self.dev.mark()
        streams = [torch.cuda.Stream() for _ in range(n)] if self.dev.cuda and concurrent else [None] * n
        if not concurrent:
            elapsed = self._timed(lambda: [self._train_untimed(i, None) for i in range(n)])
            return elapsed, self.dev.peak_since(base)
        barrier = threading.Barrier(n + 1)
        errors: list[Exception] = []

        def work(i: int) -> None:
            try:
                barrier.wait()
                self._train_untimed(i, streams[i])
            except Exception as exc:  # raised again after the join
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), name=f"hospital-{i}") for i in range(n)]
        for th in threads:
            th.start()
        self.dev.sync()
        start = time.perf_counter()
        barrier.wait()
        for th in threads:
            th.join()
        self.dev.sync()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        return elapsed, self.dev.peak_since(base)

    def _train_untimed(self, i: int, stream) -> None:
        if stream is None:
            self.hospitals[i].train(self.state, self.t, {})
            return
        stream.wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(stream):
            self.hospitals[i].train(self.state, self.t, {})
        stream.synchronize()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def measure(bench: Bench, args) -> dict:
    n = len(bench.hospitals)
    for phase in PHASES:  # warm-up: kernels, allocator, lazy imports
        bench.run_phase(phase, 0)
    bench.all_training(False)
    bench.all_training(True)
    times: dict[str, list[float]] = {ph: [] for ph in PHASES}
    peaks: dict[str, int] = {ph: 0 for ph in PHASES}
    seq, conc, seq_peak, conc_peak = [], [], 0, 0
    for r in range(args.repeats):
        order = PHASES if r % 2 == 0 else PHASES[::-1]  # drift of clocks or caches hits all phases alike
        for i in range(n):
            for phase in order:
                s, peak = bench.run_phase(phase, i)
                times[phase].append(s)
                peaks[phase] = max(peaks[phase], peak)
        for concurrent in ((False, True) if r % 2 == 0 else (True, False)):
            s, peak = bench.all_training(concurrent)
            if concurrent:
                conc.append(s)
                conc_peak = max(conc_peak, peak)
            else:
                seq.append(s)
                seq_peak = max(seq_peak, peak)
    return {"times": times, "peaks": peaks, "sequential": seq, "concurrent": conc,
            "sequential_peak": seq_peak, "concurrent_peak": conc_peak}


def summary(results: dict) -> dict:
    med = {ph: median(v) for ph, v in results["times"].items()}
    odex = med["odex score"] + med["odex entry"]
    seq, conc = median(results["sequential"]), median(results["concurrent"])
    return {
        "median_s": med,
        "aug_overhead": med["train+aug"] / med["train"],
        "odex_share_training_round": odex / (odex + med["train"]),
        "odex_share_evaluated_round": odex / (odex + med["train"] + med["eval"]),
        "sequential_s": seq,
        "concurrent_s": conc,
        "concurrent_over_sequential": conc / seq,
    }


def report(bench: Bench, args, dev: Device, prep_s: float, results: dict) -> None:
    sc, n = bench.sc, len(bench.hospitals)
    s = summary(results)
    print(f"device: {dev.describe()}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"hospitals {n}, image {args.size}x{args.size}, window {args.window}, steps {args.steps} x batch "
          f"{args.batch}, test sets {len(bench.tests)} x {args.test_size}, pool {args.members} members x "
          f"{args.entries} entries, U-Net channels {list(sc.model.channels)}, deterministic {args.deterministic}"
          f"{', episodic' if sc.augmentation.frequency.episodic else ''}")
    print(f"data and pool made in {prep_s:.1f} s (not timed); {args.repeats} repeats x {n} hospitals per phase "
          "after one warm-up")
    mem = dev.cuda
    print(f"\n{'phase':<12} {'median ms':>10} {'min ms':>10} {'max ms':>10}" + (f" {'peak MiB':>9}" if mem else ""))
    for ph in PHASES:
        v = results["times"][ph]
        print(f"{ph:<12} {median(v) * 1e3:10.1f} {min(v) * 1e3:10.1f} {max(v) * 1e3:10.1f}"
              + (f" {mib(results['peaks'][ph])}" if mem else ""))
    print(f"\naugmentation overhead, train+aug / train                      {s['aug_overhead']:.3f}")
    print(f"ODEx share of a training round, odex / (odex + train)          {s['odex_share_training_round']:.3f}")
    print(f"ODEx share of an evaluated round, odex / (odex + train + eval) {s['odex_share_evaluated_round']:.3f}")
    print("  (odex = odex score + odex entry)")
    print(f"\n{n} hospitals' training on one device, median of {args.repeats}:")
    print(f"  one after another   {s['sequential_s'] * 1e3:10.1f} ms"
          + (f"   peak {mib(results['sequential_peak']).strip()} MiB" if mem else ""))
    print(f"  {n} threads at once   {s['concurrent_s'] * 1e3:10.1f} ms"
          + (f"   peak {mib(results['concurrent_peak']).strip()} MiB, "
             f"{mib(results['concurrent_peak'] / n).strip()} MiB per hospital" if mem else ""))
    print(f"  ratio concurrent / sequential {s['concurrent_over_sequential']:.3f}   "
          f"(1/{n} = {1 / n:.3f} is perfect overlap)")


def results_json(bench: Bench, args, dev: Device, prep_s: float, results: dict) -> dict:
    out = {
        "device": dev.describe(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "cache_dir")},
        "prepare_s": prep_s,
        **summary(results),
        "samples_s": results["times"],
        "sequential_samples_s": results["sequential"],
        "concurrent_samples_s": results["concurrent"],
    }
    if dev.cuda:
        out["peak_bytes"] = {**results["peaks"], "sequential": results["sequential_peak"],
                             "concurrent": results["concurrent_peak"],
                             "concurrent_per_hospital": results["concurrent_peak"] / len(bench.hospitals)}
    return out


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--hospitals", type=int, default=3, help="virtual hospitals (each its own data and model)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--steps", type=int, default=8, help="local optimiser steps per round")
    p.add_argument("--batch", type=int, default=16, help="training batch size")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of every phase and hospital")
    p.add_argument("--window", type=int, default=32, help="training images in a hospital's window")
    p.add_argument("--test-size", type=int, default=64, help="test images per domain (two domains)")
    p.add_argument("--members", type=int, default=2, help="ODEx pool members scored against")
    p.add_argument("--entries", type=int, default=3, help="history entries per member")
    p.add_argument("--episodic", action="store_true", help="train+aug takes FedDG's episodic step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="let torch pick non-deterministic algorithms (the ClientApp does not by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="data cache (default: a temporary folder, removed after)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if min(args.hospitals, args.steps, args.batch, args.repeats, args.window, args.test_size,
           args.members, args.entries) < 1:
        p.error("counts must be >= 1")

    try:
        device = pick_device(args.device)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    dev = Device(device)

    tmp = None if args.cache_dir else tempfile.mkdtemp(prefix="simlab-bench-client-")
    try:
        sc = scenario(args, args.cache_dir or tmp)
        bench = Bench(sc, args, dev)
        prep_s = bench.prepare()
        results = measure(bench, args)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    report(bench, args, dev, prep_s, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results_json(bench, args, dev, prep_s, results), indent=2) + "\n")
        print(f"results written to {args.json}")
    return 1 if federation_imported("the client side") else 0


if __name__ == "__main__":
    sys.exit(main())
