"""Hospital streams: fresh seeded windows, fixed test sets, label fraction, caching, NIfTI source."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from simlab.data.streams import DataFactory, HospitalStream
from simlab.scenario.schema import load_scenario_dict

BASE = {
    "name": "s",
    "seed": 5,
    "data": {"image_size": 64},
    "domains": {"A": {}, "B": {"scanner": {"contrast": "inverted", "noise": 0.05}}},
    "hospitals": [
        {"id": "h1", "size": 8, "label_fraction": 0.5, "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [3]}},
        {"id": "h2", "size": 6, "drift": {"type": "gradual", "domains": ["A", "B"], "start": 1, "end": 4}},
    ],
    "federation": {"rounds": 4},
    "evaluation": {"test_size": 5},
}


def factory_for(raw, cache):
    raw = json.loads(json.dumps(raw))
    raw["data"]["cache_dir"] = str(cache)
    sc = load_scenario_dict(raw, "<test>").base
    return sc, DataFactory(sc.data, sc.domains, sc.seed, sc.evaluation.test_size)


def test_windows_are_fresh_seeded_and_cached(tmp_path):
    sc, f = factory_for(BASE, tmp_path / "c")
    h1 = HospitalStream(f, sc.hospitals[0])
    w1, w2 = h1.window(1), h1.window(2)
    assert w1.images.shape == (8, 1, 64, 64) and w1.labels.shape == (8, 64, 64)
    assert not np.allclose(w1.images, w2.images)  # a new window every round
    assert w1.true_domain == "A" and h1.window(3).true_domain == "B"
    assert w1.n_labeled == 4  # label_fraction 0.5
    assert len(sorted((tmp_path / "c").rglob("*.npz"))) == 3  # rounds 1, 2, 3
    # a second factory (e.g. another arm or a Ray actor) reads the same arrays from the cache
    _, f2 = factory_for(BASE, tmp_path / "c")
    again = HospitalStream(f2, sc.hospitals[0]).window(1)
    np.testing.assert_array_equal(again.images, w1.images)
    np.testing.assert_array_equal(again.labeled, w1.labeled)
    assert len(sorted((tmp_path / "c").rglob("*.npz"))) == 3


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    sc, f = factory_for(BASE, tmp_path / "a")
    raw = json.loads(json.dumps(BASE))
    raw["seed"] = 6
    _, g = factory_for(raw, tmp_path / "b")
    _, f_again = factory_for(BASE, tmp_path / "c")  # fresh cache: regenerated from the seed
    x = f.window(sc.hospitals[0], 2).images
    np.testing.assert_array_equal(x, f_again.window(sc.hospitals[0], 2).images)
    assert not np.allclose(x, g.window(sc.hospitals[0], 2).images)


def test_a_site_without_labels_has_no_labelled_image_and_participation_is_not_a_data_setting(tmp_path):
    raw = json.loads(json.dumps(BASE))
    raw["hospitals"][0]["label_fraction"] = 0.0
    raw["hospitals"][0]["participates"] = False
    raw["hospitals"][1]["label_fraction"] = 0.01  # > 0: at least one labelled image per window
    raw["hospitals"][1]["participates"] = False
    raw["hospitals"].append({"id": "h3", "drift": {"type": "none", "domain": "A"}})
    sc, f = factory_for(raw, tmp_path / "c")
    assert f.window(sc.hospitals[0], 1).n_labeled == 0 and f.window(sc.hospitals[1], 1).n_labeled == 1
    files = len(list((tmp_path / "c").rglob("*.npz")))
    raw["hospitals"][1]["participates"] = True  # the same window, read from the same cache file
    sc2, f2 = factory_for(raw, tmp_path / "c")
    np.testing.assert_array_equal(f2.window(sc2.hospitals[1], 1).images, f.window(sc.hospitals[1], 1).images)
    assert len(list((tmp_path / "c").rglob("*.npz"))) == files


def test_test_sets_fixed_per_domain_and_distinct_from_training(tmp_path):
    sc, f = factory_for(BASE, tmp_path / "c")
    xa, ya = f.test_set("A")
    xb, _ = f.test_set("B")
    assert xa.shape == (5, 1, 64, 64) and set(np.unique(ya)) <= {0, 1, 2}
    np.testing.assert_array_equal(xa, f.test_set("A")[0])
    assert not np.allclose(xa, xb)
    w = f.window(sc.hospitals[0], 1)
    assert not any(np.allclose(w.images[i], xa[j]) for i in range(len(w.images)) for j in range(len(xa)))


def test_gradual_mix_draws_both_domains(tmp_path):
    raw = json.loads(json.dumps(BASE))
    raw["hospitals"][1]["size"] = 40
    raw["hospitals"][1]["drift"]["mode"] = "mix"
    sc, f = factory_for(raw, tmp_path / "c")
    counts = f._assign(sc.hospitals[1], 2, __import__("simlab.data.drift", fromlist=["plan"]).plan(sc.hospitals[1].drift, 2))
    assert counts["A"] > counts["B"] > 0 and sum(counts.values()) == 40  # weights 2/3, 1/3


def write_case(root, case, vol, lab, affine=None):
    affine = np.eye(4) if affine is None else affine
    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), root / "imagesTr" / f"{case}_0000.nii.gz")
    nib.save(nib.Nifti1Image(lab.astype(np.uint8), affine), root / "labelsTr" / f"{case}.nii.gz")


def make_dataset(root, n_cases=5, shape=(24, 24, 6)):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        lab = np.zeros(shape, np.uint8)
        lab[6:18, 6:18, :] = 1
        lab[9:15, 9:15, :] = 2
        vol = 100.0 * lab + rng.normal(0, 5, shape) + 20
        write_case(root, f"case{i:02d}", vol, lab)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "outer": 1, "inner": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))


def nifti_raw(root, rounds=3, size=4):
    return {
        "name": "n", "seed": 1,
        "data": {"source": "nifti", "image_size": 32, "datasets": {"site": {"root": str(root)}},
                 "test_case_fraction": 0.4},
        "domains": {"A": {"dataset": "site"}, "B": {"dataset": "site", "scanner": {"contrast": "inverted", "noise": 0.05}}},
        "hospitals": [{"id": "h1", "size": size, "drift": {"type": "abrupt", "domains": ["A", "B"], "at": [2]}}],
        "federation": {"rounds": rounds},
        "evaluation": {"test_size": 4},
    }


def test_nifti_stream_splits_cases_and_draws_without_replacement(tmp_path):
    make_dataset(tmp_path / "ds")
    sc, f = factory_for(nifti_raw(tmp_path / "ds"), tmp_path / "c")
    assert sc.num_classes == 3
    pool = f._nifti_pool("A", "train")
    assert len(pool["images"]) == 3 * 6 and len(f._nifti_pool("A", "test")["images"]) == 2 * 6
    w1 = f.window(sc.hospitals[0], 1)
    assert w1.images.shape == (4, 1, 32, 32) and set(np.unique(w1.labels)) == {0, 1, 2}
    assert 0.0 <= w1.images.min() and w1.images.max() <= 1.0
    xt, yt = f.test_set("B")
    assert xt.shape == (4, 1, 32, 32)
    # an inverted scanner applied on top makes the (bright) inner structure the darkest foreground
    assert xt[:, 0][yt == 2].mean() < xt[:, 0][yt == 1].mean()


def test_nifti_stream_runs_out_with_a_clear_error(tmp_path):
    make_dataset(tmp_path / "ds")
    sc, f = factory_for(nifti_raw(tmp_path / "ds", rounds=3, size=12), tmp_path / "c")
    f.window(sc.hospitals[0], 1)
    with pytest.raises(ValueError, match="needs more than the 18 training slices of domain 'B'"):
        f.window(sc.hospitals[0], 3)


def test_nifti_corrupt_file_named(tmp_path):
    from simlab.data.nifti import NiftiDataError

    make_dataset(tmp_path / "ds")
    bad = tmp_path / "ds" / "labelsTr" / "case03.nii.gz"
    bad.write_bytes(bad.read_bytes()[:40])
    sc, f = factory_for(nifti_raw(tmp_path / "ds"), tmp_path / "c")
    with pytest.raises(NiftiDataError, match="case03.nii.gz"):
        f.window(sc.hospitals[0], 1)
