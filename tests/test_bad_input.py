"""A corpus of hostile and careless inputs: each is refused before a run starts, with exit status 2 and a
message naming the file and the key (or the option or environment variable), and nothing is written
anywhere (each case runs in an empty working directory that is compared before and after).

The classes: an image size the network's depth cannot take; numbers past an upper bound; numbers
that are not finite; NIfTI data that cannot be found or listed; places that cannot be written (the run
directory, the data cache); YAML too deep or integers too long to read. And the exit status of a run
in which an arm aggregated nothing (every round skipped), from its summary.
"""

from __future__ import annotations

import io
import json
import os
import textwrap

import pytest

from simlab.cli import main

GOOD = """\
name: tiny
seed: 3
data: {image_size: 32}
domains:
  A: {}
  B: {scanner: {contrast: inverted}}
hospitals:
  - id: h1
    drift: {type: abrupt, domains: [A, B], at: [2]}
  - id: h2
    drift: {type: none, domain: A}
federation: {rounds: 2}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory with its own (not yet existing) data cache, and wide messages."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "1000")  # one problem per line in the terminal output
    (tmp_path / "a-file").write_text("not a folder\n")
    return tmp_path


def tree(root) -> dict[str, float | None]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            out[os.path.relpath(p, root)] = None if os.path.isdir(p) else os.path.getsize(p)
    return out


def refused(workdir, capsys, text: str, *args: str, command: str = "validate") -> str:
    """Write ``text`` as the scenario, run ``simlab <command>`` on it; assert exit 2 and an unchanged
    working directory; return the error output with the scenario file named in it."""
    path = workdir / "scenario.yaml"
    path.write_text(textwrap.dedent(text))
    before = tree(workdir)
    extra = ("--quiet", "--no-report") if command == "run" else ()
    rc = main([command, "scenario.yaml", *args, *extra])
    out = capsys.readouterr()
    assert rc == 2, out.out + out.err
    assert tree(workdir) == before
    return out.err


def with_(section: str, text: str = GOOD) -> str:
    """GOOD with one top-level line replaced by (or, when new, added as) ``section``."""
    key = section.split(":", 1)[0]
    lines = [line for line in text.splitlines() if not line.startswith(f"{key}:")]
    return "\n".join(lines + [section]) + "\n"


def test_the_good_scenario_validates_and_writes_nothing(workdir, capsys):
    path = workdir / "scenario.yaml"
    path.write_text(GOOD)
    before = tree(workdir)
    assert main(["validate", "scenario.yaml"]) == 0
    assert "valid" in capsys.readouterr().out and tree(workdir) == before


# -------------------------------------------------------------------------- image size vs depth
@pytest.mark.parametrize("size, levels, hint", [
    (20, 4, "multiple of 8, found 20; nearest that work: 16 or 24"),
    (33, 4, "multiple of 8, found 33; nearest that work: 32 or 40"),
    (48, 6, "multiple of 32, found 48; nearest that work: 32 or 64"),
    (16, 7, "multiple of 64, found 16; nearest that work: 64"),
])
def test_an_image_size_the_unet_cannot_take_is_refused_with_the_sizes_that_work(workdir, capsys, size, levels, hint):
    err = refused(workdir, capsys, sized(size, levels))
    assert "scenario.yaml: data.image_size:" in err and hint in err and f"{levels} levels" in err


@pytest.mark.parametrize("size, levels", [(36, 3), (48, 4), (64, 7), (1024, 10)])
def test_an_image_size_that_is_a_multiple_of_the_depth_validates(workdir, capsys, size, levels):
    (workdir / "scenario.yaml").write_text(sized(size, levels))
    assert main(["validate", "scenario.yaml"]) == 0, capsys.readouterr().err


def sized(size: int, levels: int) -> str:
    channels = [4 * 2**i for i in range(levels)]
    return with_(f"model: {{channels: {channels}}}", with_(f"data: {{image_size: {size}}}"))


def test_an_arm_with_a_deeper_network_is_checked_against_the_image_size(workdir, capsys):
    text = GOOD + "arms:\n  - {name: flat}\n  - {name: deep, set: {model.channels: [2, 4, 8, 16, 32, 64, 128]}}\n"
    err = refused(workdir, capsys, text)
    assert "arms[1] (deep): data.image_size" in err and "multiple of 64, found 32; nearest that work: 64" in err


def test_no_image_size_fits_a_network_too_deep_for_the_largest(workdir, capsys):
    err = refused(workdir, capsys, with_("model: {channels: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"))
    assert "multiple of 512" in err and "nearest that work: 512" in err
    err = refused(workdir, capsys, with_("model: {channels: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}"))
    assert "scenario.yaml: model.channels: expected 2 to 10 channel counts" in err


# -------------------------------------------------------------------------- upper bounds
@pytest.mark.parametrize("text, key, fragments", [
    (with_("federation: {rounds: 1" + "0" * 99 + "}"), "federation.rounds",
     ["expected a value <= 10000 (every round's windows are generated and cached", "found an integer of about 100 digits"]),
    (with_("federation: {rounds: 10001}"), "federation.rounds", ["<= 10000", "found 10001"]),
    (with_("federation: {rounds: 1e50}"), "federation.rounds", ["expected an integer, found float 1e+50"]),
    (GOOD.replace("    drift: {type: none, domain: A}", "    drift: {type: none, domain: A}\n    size: 100000000000"),
     "hospitals[1].size", ["<= 100000 (a window is held in memory", "found 100000000000"]),
    (with_("evaluation: {test_size: 100000000000}"), "evaluation.test_size", ["<= 100000 (each domain's test set"]),
    (with_("evaluation: {test_size: 1e11}"), "evaluation.test_size", ["expected an integer, found float 100000000000.0"]),
    (with_("data: {image_size: 1024}", GOOD.replace("domain: A}", "domain: A}\n    size: 50000")), "hospitals[1].size",
     ["a training window of 50000 images of 1024² px needs 244 GiB of memory; at most 32 GiB (≤ 6553 images"]),
    (with_("seed: " + "9" * 30), "seed", ["(torch seeds are 64-bit integers)"]),
    (with_("federation: {rounds: 2, batch_size: 10000000}"), "federation.batch_size", ["<= 65536"]),
    (with_("model: {channels: [16, 1000000]}"), "model.channels", ["between 1 and 4096"]),
    (with_("evaluation: {every: 100000000000000}"), "evaluation.every", ["<= 10000 (federation.rounds ≤ 10,000"]),
    (with_("engine: {cpus_per_client: 1e300}"), "engine.cpus_per_client", ["<= 1024.0 (Ray places each virtual"]),
    (with_("federation: {rounds: 2, min_replies: 1000000000}"), "federation.min_replies", ["<= 100000"]),
])
def test_numbers_past_an_upper_bound_are_refused_with_the_reason(workdir, capsys, text, key, fragments):
    err = refused(workdir, capsys, text)
    assert err.count(f"scenario.yaml: {key}:") == 1  # one problem: the bound, or the type
    for fragment in fragments:
        assert fragment in err


LOSS_WHY = "<= 10000.0 (the segmentation loss has weight 1: a term 10,000 times heavier leaves nothing of the task"


@pytest.mark.parametrize("key, value, fragment", [
    ("continual.odex.max_members", "1000000000", "<= 64 (every member is a whole model"),
    ("continual.odex.shift.threshold_factor", "1e9", "<= 1000.0 (normalised scores lie in [0, 1]"),
    ("continual.ewc.strength", "1e12", "<= 1000000000.0 (three orders of magnitude past λ = 1e6"),
    ("continual.lwf.temperature", "1e6", "<= 100.0 (softmax(z/T) flattens towards uniform"),
    ("continual.mib.kd_weight", "1e5", LOSS_WHY),
    ("continual.plop.scales", "40", "<= 11 (at S = 11 the 2^10 × 2^10 windows"),
    ("continual.rwalk.eps", "10", "<= 1.0 (ε only keeps ½FΔθ² + ε away from zero"),
    ("augmentation.frequency.bank_size", "1000000000000", "<= 100000 (a hospital shares at most its window's images"),
    ("augmentation.frequency_refresh", "100000", "<= 10000 (federation.rounds ≤ 10,000"),
    ("federation.aggregation.eps", "5", "<= 1.0 (ε only keeps 1/d_k finite"),
    ("federation.aggregation.max_update_norm", "1e300", "<= 1000000.0 (an update this long comes from a diverged"),
    ("federation.aggregation.krum.num_malicious_nodes", "100000", "<= 1000 (f > 0 needs 2f + 3 updates per round"),
    ("federation.server_optimizer.adam.eta", "100", "<= 10.0 (each round moves every weight by up to about η"),
    ("federation.server_optimizer.adagrad.tau", "5", "<= 1.0 (τ only keeps √v + τ away from zero"),
    ("federation.semi_supervised.mean_teacher.weight", "1e5", LOSS_WHY),
    ("federation.proximal_mu", "1e6", LOSS_WHY),
])
def test_plugin_parameters_past_an_upper_bound_are_refused_with_the_reason(workdir, capsys, key, value, fragment):
    err = refused(workdir, capsys, GOOD, "--set", f"{key}={value}")
    assert err.count(f"scenario.yaml: {key}:") == 1 and f"{key}: expected a value {fragment}" in err


@pytest.mark.parametrize("args, key, fragment", [
    (["federation.min_replies=3"], "federation.min_replies",
     "expected <= 2 (the hospitals sampled per round), found 3: every round would be skipped"),
    (["federation.clients_per_round=1", "federation.min_replies=2"], "federation.min_replies", "expected <= 1"),
    (["continual.method=plop", "model.channels=[8, 16, 32, 64, 128]"], "continual.plop.scales",
     "S = 3 needs 4×4 windows on the U-Net's bottom feature map, which is 2×2 px (data.image_size 32 halved 4 "
     "times); at most S = 2 here"),
])
def test_settings_no_round_could_run_with_are_refused(workdir, capsys, args, key, fragment):
    err = refused(workdir, capsys, GOOD, *[a for kv in args for a in ("--set", kv)])
    assert f"scenario.yaml: {key}: {fragment}" in err


def test_plop_at_the_scales_the_bottom_map_takes_validates(workdir, capsys):
    (workdir / "scenario.yaml").write_text(GOOD)
    args = ["--set", "continual.method=plop", "--set", "model.channels=[8, 16, 32, 64, 128]",
            "--set", "continual.plop.scales=2"]
    assert main(["validate", "scenario.yaml", *args]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("key", ["continual.odex.max_members", "augmentation.frequency.bank_size"])
def test_plugin_integers_written_as_floats_are_refused_as_floats(workdir, capsys, key):
    err = refused(workdir, capsys, GOOD, "--set", f"{key}=1e9")
    assert f"scenario.yaml: {key}: expected an integer, found float 1000000000.0" in err


def test_every_numeric_plugin_parameter_has_an_upper_bound_with_its_reason():
    """Every number of the sections the registries contribute (methods, aggregation rules, server
    optimisers, unlabelled-data objectives, test-time adaptations) and of FedDG's augmentation: a
    registered plug-in cannot arrive without bounds."""
    import dataclasses
    from typing import get_args, get_type_hints

    from simlab.adaptation.registry import ADAPTATIONS
    from simlab.scenario.schema import AugmentationSpec, EvaluationSpec, FederationSpec
    from simlab.continual.registry import ContinualSpec

    def numbers(cls, path):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, where = hints[f.name], f"{path}.{f.name}"
            kinds = {tp, *get_args(tp)}
            for sub in (k for k in kinds if dataclasses.is_dataclass(k)):
                yield from numbers(sub, where)
            if kinds & {int, float} and bool not in kinds:
                yield where, f.metadata

    sections = [*numbers(ContinualSpec, "continual"), *numbers(AugmentationSpec, "augmentation"),
                *(n for n in numbers(FederationSpec, "federation")
                  if n[0].split(".")[1] in ("aggregation", "server_optimizer", "semi_supervised", "proximal_mu")),
                *(n for n in numbers(EvaluationSpec, "evaluation") if n[0].split(".")[1] in ADAPTATIONS)]
    assert len(sections) >= 40
    unbounded = [where for where, meta in sections if not ({"le", "lt"} & set(meta))]
    assert unbounded == []
    without_reason = [where for where, meta in sections
                      if "why" not in meta and meta.get("le", meta.get("lt")) != 1.0]  # a share, probability or decay
    assert without_reason == []


def test_an_upper_bound_is_stated_in_the_field_help():
    import dataclasses

    from simlab.scenario.schema import FederationSpec

    rounds = {f.name: f for f in dataclasses.fields(FederationSpec)}["rounds"]
    assert rounds.metadata["le"] == 10_000 and "at most 10,000" in rounds.metadata["help"]


# -------------------------------------------------------------------------- not finite
@pytest.mark.parametrize("text, args, key, found", [
    (with_("federation: {rounds: 2, lr: .inf}"), (), "federation.lr", "float inf"),
    (with_("federation: {rounds: 2, lr: .nan}"), (), "federation.lr", "float nan"),
    (with_("federation: {rounds: 2, lr: -.inf}"), (), "federation.lr", "float -inf"),
    (with_("federation: {rounds: 2, round_timeout_s: .inf}"), (), "federation.round_timeout_s", "float inf"),
    (with_("federation: {rounds: 2, proximal_mu: 1e999}"), (), "federation.proximal_mu", "float inf"),
    (GOOD, ("--set", "federation.lr=inf"), "federation.lr", "float inf"),
    (GOOD, ("--set", "continual.ewc.strength=nan"), "continual.ewc.strength", "float nan"),
])
def test_numbers_that_are_not_finite_are_refused(workdir, capsys, text, args, key, found):
    err = refused(workdir, capsys, text, *args)
    assert f"scenario.yaml: {key}: expected a finite number, found {found}" in err
    assert err.count(f": {key}:") == 1  # not also reported against its bounds


# -------------------------------------------------------------------------- sites without labels
NO_LABELS = GOOD.replace("    drift: {type: none, domain: A}", "    label_fraction: 0\n    drift: {type: none, domain: A}")


@pytest.mark.parametrize("text, args, key, fragment", [
    (NO_LABELS, (), "hospitals[1].label_fraction", "has no labelled images (label_fraction 0) and "
                                                    "federation.semi_supervised.objective is 'none'"),
    (NO_LABELS, ("--set", "federation.semi_supervised.objective=mean_teacher"), "federation.semi_supervised.weight_by",
     "reports 0 examples"),
    (GOOD, ("--set", "federation.semi_supervised.weight_by=all"), "federation.semi_supervised.weight_by",
     "which no objective trains on"),
    (GOOD, ("--set", "hospitals.0.label_fraction=-0.1"), "hospitals[0].label_fraction", "expected a value >= 0"),
    (GOOD, ("--set", "federation.semi_supervised.pseudo_label.threshold=0"),
     "federation.semi_supervised.pseudo_label.threshold", "expected a value > 0"),
])
def test_a_site_without_labels_needs_an_objective_that_can_count(workdir, capsys, text, args, key, fragment):
    err = refused(workdir, capsys, text, *args)
    assert f"scenario.yaml: {key}: " in err and fragment in err


def test_a_site_without_labels_that_does_not_participate_validates(workdir, capsys):
    path = workdir / "scenario.yaml"
    path.write_text(NO_LABELS.replace("label_fraction: 0", "label_fraction: 0\n    participates: false"))
    assert main(["validate", "scenario.yaml"]) == 0, capsys.readouterr().err


def test_a_learning_rate_past_its_bound_says_why(workdir, capsys):
    err = refused(workdir, capsys, with_("federation: {rounds: 2, lr: 1e6}"))
    assert "federation.lr: expected a value <= 1000.0 (a step this large only diverges), found 1000000.0" in err


# -------------------------------------------------------------------------- an arm that trained nothing
def _summary(**arm) -> dict:
    base = {"rounds": 4, "skipped_rounds": 0, "failed_updates": 0}
    return {"arms": {"ok": dict(base), "broken": {**base, **arm}}}


@pytest.mark.parametrize("arm, status", [
    ({"skipped_rounds": 4, "failed_updates": 8}, 1),
    ({"skipped_rounds": 3, "failed_updates": 6}, 0),  # one round aggregated: results, with warnings
    ({}, 0),
])
def test_a_run_with_an_arm_whose_every_round_was_skipped_exits_1_and_says_so(arm, status):
    from rich.console import Console

    from simlab.cli import _untrained_status
    from simlab.rundir import untrained_arms

    summary = _summary(**arm)
    console = Console(file=io.StringIO(), width=1000)
    assert _untrained_status(console, summary) == status
    text = console.file.getvalue()
    assert list(untrained_arms(summary)) == (["broken"] if status else [])
    if status:
        assert "arm broken: every one of its 4 rounds was skipped (8 failed updates)" in text and "FAILED" in text
        assert "arm ok" not in text
    else:
        assert text == ""


# -------------------------------------------------------------------------- NIfTI data
def nifti_scenario(root: str, dataset: str = "") -> str:
    return textwrap.dedent(f"""\
        name: real
        data:
          source: nifti
          image_size: 32
          datasets: {{d1: {{root: {root}{dataset}}}}}
        domains:
          A: {{dataset: d1}}
        hospitals:
          - {{id: h1, drift: {{type: none, domain: A}}}}
        federation: {{rounds: 2}}
        """)


def make_dataset(root, cases=("c1",), meta: dict | None = None):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in cases:  # file names only: validation lists the cases, reads no volume
        (root / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
        (root / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    meta = meta or {"channel_names": {"0": "T2"}, "labels": {"background": 0, "organ": 1},
                    "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("setup, dataset, key, fragments", [
    (None, "", "data.datasets.d1.root", ["/nope: folder not found"]),
    ("file", "", "data.datasets.d1.root", ["not a folder"]),
    ("no-json", "", "data.datasets.d1.root", ["dataset.json: file not found"]),
    ("bad-json", "", "data.datasets.d1.root", ["dataset.json: cannot parse JSON"]),
    ("no-cases", "", "data.datasets.d1.root", ["no case found"]),
    ("count", "", "data.datasets.d1.root", ["numTraining"]),
    ("ok", ", cases: [c1, c9]", "data.datasets.d1.cases", ["unknown case id(s) ['c9']"]),
    ("ok", ", label_map: {'7': 1}", "data.datasets.d1.label_map", ["label_map keys [7] are not declared"]),
])
def test_nifti_data_that_cannot_be_listed_is_refused_by_validate(workdir, capsys, setup, dataset, key, fragments):
    root = workdir / "ds"
    if setup == "file":
        root.write_text("x")
    elif setup == "no-json":
        root.mkdir()
    elif setup == "bad-json":
        root.mkdir()
        (root / "dataset.json").write_text("{not json")
    elif setup == "no-cases":
        make_dataset(root, cases=(), meta={"channel_names": {"0": "T2"}, "labels": {"background": 0},
                                           "numTraining": 0, "file_ending": ".nii.gz"})
    elif setup == "count":
        make_dataset(root, meta={"channel_names": {"0": "T2"}, "labels": {"background": 0},
                                 "numTraining": 3, "file_ending": ".nii.gz"})
    elif setup == "ok":
        make_dataset(root)
    err = refused(workdir, capsys, nifti_scenario(str(root if setup else workdir / "nope"), dataset))
    assert f"scenario.yaml: {key}:" in err
    for fragment in fragments:
        assert fragment in err


def test_a_listable_nifti_dataset_validates_without_reading_a_volume(workdir, capsys):
    make_dataset(workdir / "ds", cases=("c1", "c2"))
    (workdir / "scenario.yaml").write_text(nifti_scenario(str(workdir / "ds"), ", cases: [c2]"))
    assert main(["validate", "scenario.yaml"]) == 0, capsys.readouterr().err


# -------------------------------------------------------------------------- places that cannot be written
@pytest.mark.parametrize("out, fragment", [
    ("a-file/run", "a-file/run: cannot create the run directory (--out / output.dir): Not a directory"),
    ("a-file", "a-file: run directory exists and is not empty"),
    ("/proc/simlab-run", "/proc/simlab-run: cannot create the run directory (--out / output.dir)"),
    ("x" * 300, ": cannot create the run directory (--out / output.dir): File name too long"),
])
def test_a_run_directory_that_cannot_be_created_is_refused_before_anything_runs(workdir, capsys, out, fragment):
    err = refused(workdir, capsys, GOOD, "--out", out, command="run")
    assert fragment in err


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/x", ".hidden", "''", "'a\\b'", '"a\\tb"', "x" * 101])
def test_a_scenario_name_that_would_place_the_run_directory_elsewhere_is_refused(workdir, capsys, name):
    err = refused(workdir, capsys, GOOD.replace("name: tiny", f"name: {name}"))
    assert "scenario.yaml: name: expected a name of 1 to 100 printable characters" in err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_unwritable_simlab_cache_is_named(workdir, capsys, monkeypatch, command):
    monkeypatch.setenv("SIMLAB_CACHE", "/proc/simlab-cache")
    err = refused(workdir, capsys, GOOD, "--out", "run", command=command) if command == "run" else \
        refused(workdir, capsys, GOOD)
    assert "scenario.yaml: data.cache_dir (unset, so $SIMLAB_CACHE): the generated-data cache: cannot create " \
           "/proc/simlab-cache" in err


def test_a_data_cache_dir_under_a_file_is_named(workdir, capsys):
    err = refused(workdir, capsys, with_("data: {image_size: 32, cache_dir: a-file/cache}"))
    assert "scenario.yaml: data.cache_dir: the generated-data cache: a-file is not a folder" in err


# -------------------------------------------------------------------------- unreadable YAML
@pytest.mark.parametrize("text, fragment", [
    ("a: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 100 levels deep"),
    ("".join("  " * i + f"k{i}:\n" for i in range(300)), "nested more than 100 levels deep"),
    ("name: x\nseed: " + "7" * 5000 + "\n", "line 2, column 7: an integer of 5000 digits; at most 100 are read"),
])
def test_yaml_too_deep_or_integers_too_long_are_refused_with_the_line(workdir, capsys, text, fragment):
    err = refused(workdir, capsys, text)
    assert "scenario.yaml: <top>: invalid YAML: line" in err and fragment in err


@pytest.mark.parametrize("value, fragment", [
    ("[" * 1000 + "]" * 1000, "nested more than 100 levels deep"),
    ("9" * 5000, "an integer of 5000 digits"),
])
def test_set_values_too_deep_or_too_long_are_refused(workdir, capsys, value, fragment):
    err = refused(workdir, capsys, GOOD, "--set", f"seed={value}")
    assert "--set seed: <top>: invalid YAML" in err and fragment in err


def test_a_run_directory_whose_arm_skipped_every_round_fails_the_command(tmp_path):
    """The same through what a run writes: the rounds.jsonl of an engine whose arm ``ewc`` skipped every
    round and ``seq`` one; summary.json records both counts, and ``simlab run``'s ending returns 1."""
    from argparse import Namespace

    from rich.console import Console

    from simlab.cli import _finish
    from simlab.rundir import run_arms, start_run_dir
    from simlab.runlog import RunLog
    from simlab.scenario.schema import load_scenario_dict

    raw = {**json.loads(json.dumps(_RAW)), "output": {"dir": str(tmp_path / "run")}}
    loaded = load_scenario_dict(raw, "unit.yaml")
    run_dir = start_run_dir(loaded, {"engine": "test"})

    def run_arm(arm, sc):
        log = RunLog(run_dir, arm)
        try:
            for t in range(sc.federation.rounds + 1):
                for h in sc.hospitals:
                    log.metric(t, h.id, "A", "dice", 0.5)
                skipped = t > 0 and (arm == "ewc" or t == 2)
                log.round_cost(t, bytes_down=1, bytes_up=1, failed=[h.id for h in sc.hospitals] if skipped else [],
                               **({"skipped": True} if skipped else {}))
        finally:
            log.close()

    summary = run_arms(run_dir, loaded, run_arm, resume=False)
    assert [(a["rounds"], a["skipped_rounds"], a["failed_updates"]) for a in summary["arms"].values()] == \
        [(3, 1, 2), (3, 3, 6)]
    console = Console(file=io.StringIO(), width=1000)
    assert _finish(console, summary, run_dir, Namespace(no_report=True)) == 1
    out = console.file.getvalue()
    assert "FAILED arm ewc: every one of its 3 rounds was skipped (6 failed updates)" in out and "arm seq:" not in out


_RAW = {"name": "skips", "seed": 1, "data": {"image_size": 32}, "domains": {"A": {}},
        "hospitals": [{"id": "h1", "size": 4, "drift": {"type": "none", "domain": "A"}},
                      {"id": "h2", "size": 4, "drift": {"type": "none", "domain": "A"}}],
        "federation": {"rounds": 3}, "evaluation": {"every": 1},
        "arms": [{"name": "seq", "set": {"continual.method": "sequential"}},
                 {"name": "ewc", "set": {"continual.method": "ewc"}}]}
