"""Scenario loading: every malformed input is refused with a message naming file, key, expected, found."""

from __future__ import annotations

import textwrap

import pytest

from simlab.config import ScenarioError
from simlab.scenario.schema import load_scenario

GOOD = """\
name: tiny
seed: 3
data: {image_size: 64}
domains:
  A: {}
  B: {scanner: {contrast: inverted}}
hospitals:
  - id: h1
    drift: {type: abrupt, domains: [A, B], at: [3]}
  - id: h2
    drift: {type: none, domain: A}
federation: {rounds: 4}
"""


def write(tmp_path, text, name="scenario.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(path, **kw) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, **kw)
    return info.value


def test_good_scenario_fills_defaults(tmp_path):
    loaded = load_scenario(write(tmp_path, GOOD))
    sc = loaded.base
    assert sc.seed == 3 and sc.data.image_size == 64 and sc.federation.rounds == 4
    assert sc.federation.lr == pytest.approx(1e-3)  # default
    assert sc.domains["B"].scanner.contrast == "inverted"
    assert list(loaded.arms) == ["sequential"]  # no arms listed → one arm named after the method


@pytest.mark.parametrize(
    "patch, key, fragments",
    [
        ("federation: {rounds: 4, lr: fast}", "federation.lr", ["expected a number", "str 'fast'"]),
        ("federation: {rounds: 4, rounds_total: 9}", "federation.rounds_total", ["unknown key", "known keys here"]),
        ("federation: {rounds: 0}", "federation.rounds", ["expected a value >= 1", "found 0"]),
        ("federation: {rounds: 4, aggregation: {rule: mode}}", "federation.aggregation.rule",
         ["one of 'fedavg', 'ida', 'ida_fedavg', 'median', 'trimmed_mean'", "str 'mode'"]),
        ("federation: {rounds: 4, clients_per_round: 5}", "federation.clients_per_round", ["expected <= 2", "found 5"]),
        ("federation: {rounds: 4}\nengine: {device: tpu}", "engine.device", ["one of 'auto', 'cpu', 'cuda'", "'tpu'"]),
        ("federation: {rounds: 4}\nevaluation: {every: 2, test_size: -1}", "evaluation.test_size", [">= 1", "-1"]),
    ],
)
def test_section_errors_name_key_expected_found(tmp_path, patch, key, fragments):
    text = GOOD.replace("federation: {rounds: 4}", patch)
    path = write(tmp_path, text)
    err = error_of(path)
    msg = str(err)
    assert str(path) in msg
    assert any(k == key for k, _ in err.problems), err.problems
    for f in fragments:
        assert f in msg, msg


def test_drift_errors(tmp_path):
    err = error_of(write(tmp_path, GOOD.replace("at: [3]", "at: [3, 4]")))
    assert "expected 1 switch rounds (one per change), found 2" in dict(err.problems)["hospitals[0].drift.at"]
    err = error_of(write(tmp_path, GOOD.replace("type: none, domain: A", "type: none, domain: Z")))
    assert "unknown domain 'Z' (named domains: A, B)" in dict(err.problems)["hospitals[1].drift"]


def test_switch_after_last_round(tmp_path):
    err = error_of(write(tmp_path, GOOD.replace("at: [3]", "at: [9]")))
    assert dict(err.problems)["hospitals[0].drift.at"].startswith("switch round 9 is after the last round (4)")


def test_missing_required_and_wrong_container(tmp_path):
    err = error_of(write(tmp_path, GOOD.replace("  - id: h2\n", "  - size: 8\n")))
    assert dict(err.problems)["hospitals[1].id"].startswith("missing required key")
    err = error_of(write(tmp_path, GOOD.replace("domains:\n  A: {}\n  B: {scanner: {contrast: inverted}}",
                                                "domains: [A, B]")))
    assert "expected a mapping of a mapping, found list" in dict(err.problems)["domains"]


def test_scanner_fields_validated(tmp_path):
    err = error_of(write(tmp_path, GOOD.replace("{contrast: inverted}", "{contrast: inverted, gibbs: 1.5, blur: [1]}")))
    keys = dict(err.problems)
    assert "found 1.5" in keys["domains.B.scanner.gibbs"]
    assert "expected a number, found list" in keys["domains.B.scanner.blur"]


def test_duplicate_hospitals_and_arm_sections(tmp_path):
    text = GOOD.replace("  - id: h2\n", "  - id: h1\n") + "arms:\n  - {name: a, set: {data.image_size: 32}}\n"
    err = error_of(write(tmp_path, text))
    keys = dict(err.problems)
    assert "duplicate hospital id 'h1'" in keys["hospitals[1].id"]
    assert "streams and test sets stay identical across arms" in keys["arms[0].set.data.image_size"]


def test_arms_may_change_the_evaluation_adaptation_only(tmp_path):
    """Test sets stay identical across arms: an arm may choose how the deployed model is adapted, not
    what it is evaluated on."""
    text = GOOD + "arms:\n  - {name: a, set: {evaluation.adaptation: adabn}}\n  - {name: b, set: {evaluation.test_size: 4}}\n"
    keys = dict(error_of(write(tmp_path, text)).problems)
    assert list(keys) == ["arms[1].set.evaluation.test_size"]
    loaded = load_scenario(write(tmp_path, GOOD + "arms:\n  - {name: a, set: {evaluation.adaptation: adabn}}\n  - {name: b}\n"))
    assert [sc.evaluation.adaptation for sc in loaded.arms.values()] == ["adabn", "none"]


@pytest.mark.parametrize("reserved", ["all", "pooled", "server"])
def test_hospital_ids_that_name_result_rows_are_refused(tmp_path, reserved, capsys):
    from simlab.cli import main

    path = write(tmp_path, GOOD.replace("  - id: h2\n", f"  - id: {reserved}\n"))
    err = error_of(path)
    assert f"{reserved!r} is reserved" in dict(err.problems)["hospitals[1].id"]
    assert main(["validate", str(path)]) == 2
    assert "hospitals[1].id" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", ".hidden", "''", "'two words'"])
def test_hospital_ids_that_would_leave_or_hide_in_the_run_directory_are_refused(tmp_path, bad, capsys):
    """A hospital id names files (R/<arm>/<hospital>.csv, its state directory): no separators, no
    leading dot, nothing empty, refused at validation with the key, before any engine starts."""
    from simlab.cli import main

    path = write(tmp_path, GOOD.replace("  - id: h2\n", f"  - id: {bad}\n"))
    assert "names files in the run directory" in dict(error_of(path).problems)["hospitals[1].id"]
    assert main(["validate", str(path)]) == 2
    assert "hospitals[1].id" in capsys.readouterr().err


def test_a_float_written_with_an_exponent_and_no_dot_is_a_number_in_files_too(tmp_path):
    """YAML 1.1 reads ``1e-3`` as text; a scenario file means the number, as ``--set`` does."""
    sc = load_scenario(write(tmp_path, GOOD.replace("federation: {rounds: 4}", "federation: {rounds: 4, lr: 1e-3}"))).base
    assert sc.federation.lr == 0.001
    sc = load_scenario(write(tmp_path, GOOD.replace("federation: {rounds: 4}", "federation: {rounds: 4, lr: 2E-4}"))).base
    assert sc.federation.lr == 2e-4
    quoted = GOOD.replace("federation: {rounds: 4}", "federation: {rounds: 4, lr: '1e-3'}")
    assert "federation.lr" in dict(error_of(write(tmp_path, quoted)).problems)  # quoted: text, as written


def test_a_key_written_twice_in_one_mapping_is_refused_with_both_lines(tmp_path, capsys):
    from simlab.cli import main

    path = write(tmp_path, GOOD.replace("federation: {rounds: 4}", "federation:\n  rounds: 4\n  lr: 0.1\n  rounds: 8"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "duplicate key 'rounds' (lines 13 and 15)" in err and str(path) in err


def test_domain_names_that_reach_file_names_are_refused(tmp_path):
    text = GOOD.replace("  B: {scanner: {contrast: inverted}}", "  ../B: {scanner: {contrast: inverted}}")
    assert "domains.../B" in dict(error_of(write(tmp_path, text.replace("[A, B]", "[A, ../B]"))).problems)


def test_arm_override_errors_name_the_arm(tmp_path):
    text = GOOD + "arms:\n  - {name: fast, set: {federation.lr: -1}}\n"
    err = error_of(write(tmp_path, text))
    assert any(k.startswith("arms[0] (fast): federation.lr") for k, _ in err.problems), err.problems


def test_arms_resolve_on_identical_data(tmp_path):
    text = GOOD + ("arms:\n  - {name: seq, set: {continual.method: sequential}}\n"
                   "  - {name: up, set: {continual.method: replay, federation.lr: 0.01}}\n")
    loaded = load_scenario(write(tmp_path, text))
    assert loaded.arms["up"].continual.method == "replay" and loaded.arms["up"].federation.lr == 0.01
    assert loaded.arms["seq"].federation.lr == 1e-3
    assert loaded.arms["seq"].data == loaded.arms["up"].data and loaded.arms["seq"].hospitals == loaded.arms["up"].hospitals


def test_the_method_once_called_joint_is_refused_with_its_new_names(tmp_path, capsys):
    text = GOOD + "arms:\n  - {name: old, set: {continual.method: joint}}\n"
    err = error_of(write(tmp_path, text))
    problems = dict(err.problems)
    assert "renamed to 'replay'" in problems["arms[0] (old): continual.method"]
    assert "'upper_bound'" in problems["arms[0] (old): continual.method"]
    assert "renamed to 'replay'" in dict(error_of(write(tmp_path, GOOD), overrides=["continual.method=joint"]).problems)[
        "continual.method"]
    from simlab.cli import main

    assert main(["validate", str(write(tmp_path, text))]) == 2
    assert "continual.method" in capsys.readouterr().err


def test_set_overrides_and_seed(tmp_path):
    loaded = load_scenario(write(tmp_path, GOOD), overrides=["federation.lr=0.05", "hospitals.1.size=7"], seed=11)
    assert loaded.base.federation.lr == 0.05 and loaded.base.hospitals[1].size == 7 and loaded.base.seed == 11
    assert load_scenario(write(tmp_path, GOOD), overrides=["federation.lr=1e-6"]).base.federation.lr == 1e-6
    err = error_of(write(tmp_path, GOOD), overrides=["federation.lr=[1, 2]"])
    assert "expected a number, found list" in dict(err.problems)["federation.lr"]
    err = error_of(write(tmp_path, GOOD), overrides=["hospitals.5.size=7"])
    assert "no list element '5'" in str(err)


def test_yaml_object_tags_refused(tmp_path):
    path = write(tmp_path, GOOD + "description: !!python/object/apply:os.system ['echo pwned']\n")
    err = error_of(path)
    assert str(path) in str(err) and "invalid YAML" in str(err) and "python/object" in str(err)


def test_alias_bomb_refused(tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    err = error_of(path)
    assert "expands to more than" in str(err)


def test_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "name: x\ndomains: {A: {}\n")
    assert "line" in str(error_of(path)) and str(path) in str(error_of(path))


def test_missing_file_and_non_mapping(tmp_path):
    assert "file not found" in str(error_of(tmp_path / "nope.yaml"))
    assert "expected a mapping at the top level, found list" in str(error_of(write(tmp_path, "- 1\n- 2\n")))


def test_ready_scenarios_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "scenarios"
    files = sorted(root.glob("*.yaml"))
    assert files, "scenarios/ holds no scenario"
    for f in files:
        loaded = load_scenario(f)
        assert loaded.base.hospitals
