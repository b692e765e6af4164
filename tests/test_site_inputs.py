"""Who checks which inputs. In a deployment the data lives at the hospitals' sites: the server checks
the scenario and the run directory, and each hospital checks the NIfTI datasets it will read (with its
node's data directory) and its data cache when it is identified, so that a bad site stops the run
before round 0 with a message naming the hospital, its node, the key and the file. Here with real
Flower messages and the ClientApp in this process (:mod:`local_flower`), without a deployment."""

from __future__ import annotations

import json
import textwrap

import pytest

from local_flower import LocalGrid, node_context, task_identity
from simlab.federated import codec
from simlab.federated.client_app import app as client_app
from simlab.federated.federation import Federation, FederationError
from simlab.runlog import RunLog
from simlab.scenario.schema import load_scenario_dict
from simlab.scenario.task import task_json, task_of

SERVER_ROOT = "/nonexistent/on-the-server"


def make_dataset(root, cases=("c1", "c2"), meta: dict | None = None):
    """An nnU-Net raw dataset of empty case files: what a hospital checks lists files, reads no volume."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in cases:
        (root / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
        (root / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    (root / "dataset.json").write_text(json.dumps(meta or {"channel_names": {"0": "T2"},
                                                           "labels": {"background": 0, "organ": 1},
                                                           "numTraining": len(cases), "file_ending": ".nii.gz"}))


def two_sites(**federation):
    """siteA's data at hospital a's node only, siteB's at hospital b's; the scenario names server paths
    that exist nowhere, as a multi-site scenario written at the server does."""
    return load_scenario_dict({**multisite(), "federation": {"rounds": 2, **federation}}, "multisite.yaml").base


def yaml_dict(text):
    import yaml

    return yaml.safe_load(textwrap.dedent(text))


def multisite() -> dict:
    return yaml_dict(f"""\
        name: multisite
        data:
          source: nifti
          image_size: 32
          datasets: {{siteA: {{root: {SERVER_ROOT}/A}}, siteB: {{root: {SERVER_ROOT}/B}}}}
        domains: {{A: {{dataset: siteA}}, B: {{dataset: siteB}}}}
        hospitals:
          - {{id: a, drift: {{type: none, domain: A}}}}
          - {{id: b, drift: {{type: none, domain: B}}}}
        """)


def sites(tmp_path, broken: str | None = None) -> list[dict]:
    """Node configs of hospitals a and b, each data-dir holding its own dataset (``broken``: that
    hospital's dataset has no dataset.json)."""
    configs = []
    for hid, name in (("a", "siteA"), ("b", "siteB")):
        make_dataset(tmp_path / hid / name)
        if hid == broken:
            (tmp_path / hid / name / "dataset.json").unlink()
        configs.append({"hospital-id": hid, "data-dir": str(tmp_path / hid), "state-dir": str(tmp_path / "state" / hid)})
    return configs


def identify(sc, configs, tmp_path):
    runlog = RunLog(tmp_path, "arm")
    try:
        with task_identity():
            fed = Federation(LocalGrid(client_app, configs), sc, runlog)
            fed.run_key = "arm-1"  # names the run's saved hospital state (set by Federation.run)
            fed.identify()
        return fed
    finally:
        runlog.close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMLAB_CACHE", str(tmp_path / "cache"))


def test_sites_that_hold_their_own_data_pass_identification(tmp_path):
    sc = two_sites()
    fed = identify(sc, sites(tmp_path), tmp_path)
    assert fed.node_of == {"a": 1001, "b": 1002}
    # one model deployed everywhere: each domain is evaluated by the hospital whose stream reads it
    assert fed.domains_read() == {"a": ["A"], "b": ["B"]}


def test_a_site_whose_dataset_cannot_be_listed_stops_the_run_at_identification(tmp_path):
    sc = two_sites()
    with pytest.raises(FederationError) as err:
        identify(sc, sites(tmp_path, broken="b"), tmp_path)
    text = str(err.value)
    assert "stop the run before round 0" in text
    line = next(x for x in text.splitlines() if "hospital b" in x)
    assert line.strip() == (f"hospital b (node 1002): data.datasets.siteB.root: {tmp_path / 'b' / 'siteB'}/"
                            f"dataset.json: file not found (every dataset needs ROOT/dataset.json) (this node's "
                            f"data-dir: {tmp_path / 'b'})")
    assert "hospital a" not in text


def test_a_site_without_the_data_it_must_evaluate_is_named(tmp_path):
    """Per-hospital models (FedBN) are evaluated by every hospital on every domain: each site needs every
    dataset, and a site with only its own is told which one it lacks and where it looked."""
    sc = two_sites(norm="local")
    with pytest.raises(FederationError) as err:
        identify(sc, sites(tmp_path), tmp_path)
    lines = [x.strip() for x in str(err.value).splitlines()[1:]]
    assert lines == [f"hospital a (node 1001): data.datasets.siteB.root: {SERVER_ROOT}/B: folder not found "
                     f"(this node's data-dir: {tmp_path / 'a'})",
                     f"hospital b (node 1002): data.datasets.siteA.root: {SERVER_ROOT}/A: folder not found "
                     f"(this node's data-dir: {tmp_path / 'b'})"]


def test_an_unwritable_data_cache_at_a_site_is_named_with_its_node_config(tmp_path):
    """Generated data: a node's data-dir is its cache; one that is not writable is refused by name."""
    sc = load_scenario_dict(yaml_dict("""\
        name: phantom
        data: {image_size: 32}
        domains: {A: {}}
        hospitals:
          - {id: a, drift: {type: none, domain: A}}
        federation: {rounds: 2}
        """), "phantom.yaml").base
    cfg = {"hospital-id": "a", "data-dir": "/proc"}
    with pytest.raises(FederationError, match=r"hospital a \(node 1001\): node config data-dir='/proc' \(this "
                                              r"node's data cache\): the generated-data cache: .*/proc"):
        identify(sc, [cfg], tmp_path)


def test_the_input_check_query_round_trips_and_refuses_another_hospitals_task(tmp_path):
    sc = two_sites()
    sites(tmp_path)
    with task_identity():
        from flwr.app import Message

        ask = codec.CheckInputs(task_json(task_of(sc, "a")), ["A"])
        assert codec.decode_check_inputs(codec.encode(ask)) == ask
        msg = Message(codec.encode(ask), dst_node_id=1, message_type=codec.INPUTS)
        msg.metadata.__dict__["_message_id"] = "m1"
        reply = client_app(msg, node_context(1, {"hospital-id": "a", "data-dir": str(tmp_path / "a")}))
        assert codec.decode_inputs_reply(reply.content) == []
        with pytest.raises(ValueError, match="this node is hospital 'b' but was sent the task of 'a'"):
            client_app(msg, node_context(2, {"hospital-id": "b", "data-dir": str(tmp_path / "b")}))


def test_resuming_a_deployment_does_not_check_the_sites_data_at_the_server(tmp_path, monkeypatch, capsys):
    """``simlab run --resume`` of a deployment's run goes to the deployment (whose hospitals check their
    data) even though the NIfTI roots do not exist on the server; a simulation's resume checks them."""
    import simlab.engine.deploy_run
    from simlab.cli import main
    from simlab.engine.flwr_config import DeploymentError
    from simlab.rundir import start_run_dir

    raw = {**multisite(), "output": {"dir": str(tmp_path / "run")}}
    loaded = load_scenario_dict(raw, str(tmp_path / "multisite.yaml"))
    run_dir = start_run_dir(loaded, {"engine": "deployment", "deployment_state": str(tmp_path / "state")})

    def reached(*args, **kwargs):
        raise DeploymentError("the deployment was asked to continue the run")

    monkeypatch.setattr(simlab.engine.deploy_run, "run_deployment", reached)
    assert main(["run", "--resume", str(run_dir), "--quiet", "--no-report"]) == 1
    assert "the deployment was asked to continue the run" in capsys.readouterr().err
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "engine": "simulation"}))
    assert main(["run", "--resume", str(run_dir), "--quiet", "--no-report"]) == 2
    assert f"data.datasets.siteA.root: {SERVER_ROOT}/A: folder not found" in capsys.readouterr().err
