"""Baseline attribution methods (Captum / MONAI) and native-space export of maps."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from neuroexplain.attribution import METHODS, BaselineExplainer, attribute_baselines
from neuroexplain.attribution.export import map_path, write_subject_maps
from neuroexplain.attribution.saliency import select_subjects
from neuroexplain.classifier import build_model, save_classifier
from neuroexplain.cli import main
from neuroexplain.mri.preprocess import to_model

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Linear(nn.Module):
    """logit = sum(w * x) + b: every baseline has a closed form for it."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.conv = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) * self.w).flatten(1).sum(1, keepdim=True) + 0.5


@pytest.fixture(scope="module")
def lin():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, SIZE, SIZE, SIZE, generator=g)
    x = torch.rand(2, 1, SIZE, SIZE, SIZE, generator=g)
    return _Linear(w).eval(), w, x


# -------------------------------------------------------------------------- methods, analytic


def test_gradient_methods_on_a_linear_model(lin):
    model, w, x = lin
    grad = BaselineExplainer(model, "gradient").attribute(x)
    assert grad.shape == x.shape
    assert torch.allclose(grad, w.expand_as(x), atol=1e-6)  # signed by default
    assert torch.allclose(
        BaselineExplainer(model, "gradient", abs=True).attribute(x), w.abs().expand_as(x)
    )
    assert torch.allclose(BaselineExplainer(model, "gradxinput").attribute(x), w * x, atol=1e-6)
    # IG of a linear function from a zero baseline is exactly w * x (completeness)
    ig = BaselineExplainer(model, "ig", n_steps=4).attribute(x)
    assert torch.allclose(ig, w * x, atol=1e-5)
    # SmoothGrad of a linear function is its (constant) gradient
    sg = BaselineExplainer(model, "smoothgrad", nt_samples=3).attribute(x)
    assert torch.allclose(sg, w.expand_as(x), atol=1e-5)


def test_occlusion_is_logit_drop(lin):
    model, w, x = lin
    occ = BaselineExplainer(model, "occlusion", mask_size=4, overlap=0.0, mode=0.0).attribute(x[:1])
    assert occ.shape == (1, 1, SIZE, SIZE, SIZE)
    # non-overlapping 4³ patches filled with 0: the drop is the patch's sum of w * x
    contrib = (w * x[:1])[0, 0].reshape(4, 4, 4, 4, 4, 4).sum(axis=(1, 3, 5))
    expect = contrib.repeat_interleave(4, 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.allclose(occ[0, 0], expect, atol=1e-4)


def test_every_method_on_the_cnn_and_no_hooks_left():
    torch.manual_seed(0)
    net = build_model("small", spatial_size=(SIZE,) * 3).eval()
    x = torch.rand(2, 1, SIZE, SIZE, SIZE)
    maps = attribute_baselines(
        net,
        x,
        METHODS,
        layer="features.1",
        params={
            "occlusion": {"mask_size": 8},
            "ig": {"n_steps": 4},
            "smoothgrad": {"nt_samples": 2},
        },
    )
    assert set(maps) == set(METHODS)
    for m, a in maps.items():
        assert a.shape[0] == 2 and a.shape[2:] == x.shape[2:], m
        assert torch.isfinite(a).all() and a.abs().sum() > 0, m
    assert (maps["gradcam"] >= 0).all()  # ReLU of the weighted activations
    assert all(not mod._forward_hooks and not mod._backward_hooks for mod in net.modules())
    # SmoothGrad is seeded
    again = BaselineExplainer(net, "smoothgrad", nt_samples=2).attribute(x)
    assert torch.equal(again, maps["smoothgrad"])


def test_gradcam_does_not_keep_its_model_copy_alive():
    """MONAI's hooks and its stored activations form a cycle through the autograd graph that
    the garbage collector cannot free: without breaking it, every call leaked a model copy."""
    import gc

    torch.manual_seed(0)
    net = build_model("small", spatial_size=(SIZE,) * 3).eval()
    x = torch.rand(1, 1, SIZE, SIZE, SIZE)
    explainer = BaselineExplainer(net, "gradcam", layer="features.1")
    first = explainer.attribute(x)
    for _ in range(3):
        assert torch.equal(explainer.attribute(x), first)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) is type(net) and o is not net]
    assert not alive


def test_bad_method_options():
    net = build_model("small", spatial_size=(SIZE,) * 3)
    with pytest.raises(ValueError, match="unknown attribution method"):
        BaselineExplainer(net, "lime")
    with pytest.raises(ValueError, match="no layer named"):
        BaselineExplainer(net, "gradcam", layer="features.7")
    with pytest.raises(ValueError, match="needs a layer"):
        BaselineExplainer(net, "gradcam")
    with pytest.raises(ValueError, match="unknown parameters"):
        BaselineExplainer(net, "ig", steps=3)


# ----------------------------------------------------------------------------- native export


def _native_subject(tmp_path, i: int):
    """An IXI-like native T1w: permuted, flipped voxel axes; sform code 2, qform code 1."""
    shape = (20, 18, 14)
    affine = np.array(
        [
            [0.0, 0.0, -2.5, 20.0 + i],
            [-2.0, 0.0, 0.0, 25.0],
            [0.0, 2.2, 0.0, -18.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    rng = np.random.default_rng(i)
    data = (rng.random(shape) * 100).astype(np.uint8)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=1)
    path = tmp_path / f"sub-{i:02d}_T1w.nii.gz"
    nib.save(img, path)
    return nib.load(path), path


def _preproc(tmp_path, n: int = 2) -> dict:
    """A hand-made preproc.pt dict: a 16³ RAS model grid of 3.5 mm over each native T1w."""
    imgs, model_affines, natives, t1_paths = [], [], [], []
    for i in range(n):
        img, path = _native_subject(tmp_path, i)
        world_centre = img.affine @ np.r_[(np.array(img.shape) - 1) / 2, 1.0]
        model_aff = np.diag([3.5, 3.5, 3.5, 1.0])
        model_aff[:3, 3] = world_centre[:3] - 3.5 * (SIZE - 1) / 2
        imgs.append(to_model(img.get_fdata().astype(np.float32) / 100, img, model_aff, (SIZE,) * 3))
        model_affines.append(model_aff)
        natives.append(img)
        t1_paths.append(str(path))
    return {
        "images": torch.tensor(np.stack(imgs)[:, None], dtype=torch.float32),
        "dseg": None,
        "subjects": [f"sub-{i:02d}" for i in range(n)],
        "y": torch.tensor([0.0, 1.0] * (n // 2)),
        "label": ["control", "disease"] * (n // 2),
        "positive_class": "disease",
        "model_affines": torch.tensor(np.stack(model_affines)),
        "native_affines": torch.tensor(np.stack([im.affine for im in natives])),
        "native_shapes": torch.tensor([im.shape for im in natives]),
        "t1_paths": t1_paths,
        "dseg_paths": [""] * n,
        "dseg_names": {},
        "params": {},
    }


def test_written_map_overlays_the_native_t1w(tmp_path):
    pre = _preproc(tmp_path)
    model_aff = pre["model_affines"][1].numpy()
    # a map that is linear in world coordinates on the model grid ...
    ijk = np.stack(np.meshgrid(*[np.arange(SIZE)] * 3, indexing="ij"), -1).astype(np.float64)
    world = ijk @ model_aff[:3, :3].T + model_aff[:3, 3]
    coef = np.array([0.3, -0.2, 0.1])
    vol = (world @ coef).astype(np.float32)
    paths = write_subject_maps(
        {"lin": vol, "zero": np.zeros_like(vol)},
        pre,
        1,
        tmp_path / "sal",
        sidecar={"CheckpointSHA256": "abc"},
        method_sidecars={"lin": {"Parameters": {"k": 1}}},
    )
    assert paths["lin"] == map_path(tmp_path / "sal", "sub-01", "lin", "saliency")
    assert paths["lin"].name == "sub-01_desc-lin_saliency.nii.gz"
    t1 = nib.load(pre["t1_paths"][1])
    out = nib.load(paths["lin"])
    assert out.shape == t1.shape
    assert np.array_equal(out.affine, t1.affine)
    assert np.array_equal(out.get_sform(), t1.get_sform()) and np.array_equal(
        out.get_qform(), t1.get_qform()
    )
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    assert out.get_data_dtype() == np.float32
    assert out.header.get_intent()[0] == "estimate"
    assert b"lin" in out.header["descrip"].tobytes()
    # ... comes out as the same linear function of each native voxel's world position
    nat_ijk = np.stack(np.meshgrid(*[np.arange(s) for s in t1.shape], indexing="ij"), -1)
    nat_world = nat_ijk @ t1.affine[:3, :3].T + t1.affine[:3, 3]
    inv = np.linalg.inv(model_aff)
    model_idx = nat_world @ inv[:3, :3].T + inv[:3, 3]
    inside = np.all((model_idx >= 0) & (model_idx <= SIZE - 1), axis=-1)
    assert inside.mean() > 0.5
    got = np.asarray(out.dataobj)
    assert np.allclose(got[inside], (nat_world @ coef)[inside], atol=1e-3)
    side = json.loads(paths["lin"].with_name("sub-01_desc-lin_saliency.json").read_text())
    assert side["Method"] == "lin" and side["CheckpointSHA256"] == "abc"
    assert side["Parameters"] == {"k": 1} and side["Subject"] == "sub-01"


def test_export_rejects_wrong_shapes_and_moved_images(tmp_path):
    pre = _preproc(tmp_path)
    with pytest.raises(ValueError, match="model-grid map"):
        write_subject_maps({"x": np.zeros((8, 8, 8))}, pre, 0, tmp_path / "o")
    with pytest.raises(ValueError, match="alphanumeric"):
        write_subject_maps({"bad_name": np.zeros((SIZE,) * 3)}, pre, 0, tmp_path / "o")
    pre["native_shapes"][0] = torch.tensor([9, 9, 9])
    from neuroexplain.errors import InputError

    with pytest.raises(InputError, match="grid mismatch"):
        write_subject_maps({"x": np.zeros((SIZE,) * 3)}, pre, 0, tmp_path / "o")


def test_select_subjects(tmp_path):
    subs = ["sub-a", "sub-b", "sub-c"]
    (tmp_path / "split.tsv").write_text(
        "subject\tsplit\ty\nsub-a\ttrain\t0\nsub-b\ttest\t1\nsub-c\ttest\t0\n"
    )
    assert select_subjects("test", subs, split=tmp_path / "split.tsv") == [1, 2]
    assert select_subjects("all", subs) == [0, 1, 2]
    assert select_subjects("c,sub-a", subs) == [2, 0]
    from neuroexplain.errors import InputError

    with pytest.raises(InputError, match="not in the preprocessed data"):
        select_subjects("sub-z", subs)
    with pytest.raises(InputError, match=r"needs a split\.tsv"):
        select_subjects("test", subs)


def _save_tiny_classifier(path):
    """A seeded, untrained small network saved as a classifier checkpoint; returns it."""
    torch.manual_seed(0)
    net = build_model("small", spatial_size=(SIZE,) * 3).eval()
    save_classifier(
        path,
        net,
        arch="small",
        model_kwargs={},
        input_shape=[1, SIZE, SIZE, SIZE],
        config={},
        epoch=1,
        seed=0,
        best_metric={"name": "val_loss", "value": 0.5},
    )
    return net


def test_cli_saliency_writes_native_maps(tmp_path):
    pre = _preproc(tmp_path, n=2)
    torch.save(pre, tmp_path / "preproc.pt")
    _save_tiny_classifier(tmp_path / "model.pt")
    (tmp_path / "split.tsv").write_text("subject\tsplit\ty\nsub-00\ttrain\t0\nsub-01\ttest\t1\n")
    rc = main(
        [
            "saliency",
            "--preproc",
            str(tmp_path / "preproc.pt"),
            "--checkpoint",
            str(tmp_path / "model.pt"),
            "--out",
            str(tmp_path / "sal"),
            "--layer",
            "features.1",
            "--ig-steps",
            "2",
            "--smoothgrad-samples",
            "2",
            "--occlusion-mask",
            "8",
            "--occlusion-overlap",
            "0",
        ]
    )
    assert rc == 0
    t1 = nib.load(pre["t1_paths"][1])
    for m in METHODS:
        p = tmp_path / "sal" / "sub-01" / f"sub-01_desc-{m}_saliency.nii.gz"
        img = nib.load(p)
        assert img.shape == t1.shape and np.array_equal(img.affine, t1.affine)
        side = json.loads(p.with_suffix("").with_suffix(".json").read_text())
        assert side["Method"] == m and len(side["CheckpointSHA256"]) == 64
    assert not (tmp_path / "sal" / "sub-00").exists()  # only the test split
    summary = json.loads((tmp_path / "sal" / "saliency.json").read_text())
    assert set(summary["maps"]) == {"sub-01"}
    # the maps manifest lists exactly the maps written, in the order of the methods
    from neuroexplain.stage import read_maps_manifest

    man = read_maps_manifest(tmp_path / "sal" / "maps.json")
    assert man.stage == "saliency" and list(man.methods) == list(METHODS) == man.primary
    assert set(man.methods.values()) == {"saliency"}
    listed = {f for files in man.files.values() for f in files.values()}
    assert listed == set((tmp_path / "sal").glob("sub-*/*.nii.gz"))
    assert {s for files in man.files.values() for s in files} == {"sub-01"}
    # bad method / layer: one-line user errors
    assert (
        main(
            [
                "saliency",
                "--preproc",
                str(tmp_path / "preproc.pt"),
                "--checkpoint",
                str(tmp_path / "model.pt"),
                "--out",
                str(tmp_path / "x"),
                "--methods",
                "lime",
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "saliency",
                "--preproc",
                str(tmp_path / "preproc.pt"),
                "--checkpoint",
                str(tmp_path / "model.pt"),
                "--out",
                str(tmp_path / "x"),
                "--methods",
                "gradcam",
                "--layer",
                "nope",
            ]
        )
        == 2
    )


def test_map_overlays_a_real_ixi_t1w(ixi_root, tmp_path):
    """Real header quirks (permuted axes, sform / qform codes) survive the round trip."""
    from neuroexplain.mri.preprocess import preprocess_subject

    t1_path = sorted(ixi_root.glob("sub-*/anat/sub-*_T1w.nii.gz"))[0]
    sub = t1_path.name.split("_")[0]
    pre_one = preprocess_subject(t1_path, shape=(32, 32, 32), fov_mm=224.0)
    pre = {
        "images": torch.tensor(pre_one.image[None, None]),
        "subjects": [sub],
        "model_affines": torch.tensor(pre_one.model_affine[None]),
        "native_affines": torch.tensor(pre_one.native_affine[None]),
        "native_shapes": torch.tensor([pre_one.native_shape]),
        "t1_paths": [str(t1_path)],
    }
    paths = write_subject_maps({"image": pre_one.image}, pre, 0, tmp_path)
    t1, out = nib.load(t1_path), nib.load(paths["image"])
    assert out.shape == t1.shape and np.array_equal(out.affine, t1.affine)
    assert np.array_equal(out.get_sform(coded=True)[0], t1.get_sform(coded=True)[0])
    assert out.get_sform(coded=True)[1] == t1.get_sform(coded=True)[1]
    assert out.get_qform(coded=True)[1] == t1.get_qform(coded=True)[1]
    assert np.allclose(out.header.get_zooms()[:3], t1.header.get_zooms()[:3])
    # the model-grid image mapped back correlates with the original intensities in the head
    native = np.asarray(t1.dataobj, dtype=np.float64)
    back = np.asarray(out.dataobj, dtype=np.float64)
    head = back > 0.05
    assert head.mean() > 0.1
    assert np.corrcoef(native[head], back[head])[0, 1] > 0.8


def test_saliency_of_chosen_subjects_equals_each_subject_explained_alone(tmp_path):
    """run_saliency keeps only the chosen subjects of preproc.pt (in the order chosen): each
    map is the one of the subject's own volume, written as from the whole cohort."""
    from neuroexplain.attribution.saliency import run_saliency
    from neuroexplain.stage import preproc_subset

    pre = _preproc(tmp_path, n=4)
    pre["groups"] = list(pre["subjects"])
    pre["y"] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    torch.save(pre, tmp_path / "preproc.pt")
    sub = preproc_subset(pre, [3, 1])
    assert sub["subjects"] == ["sub-03", "sub-01"] and sub["dseg"] is None
    assert torch.equal(sub["images"], pre["images"][[3, 1]])
    assert torch.equal(sub["native_affines"][0], pre["native_affines"][3])
    assert sub["t1_paths"] == [pre["t1_paths"][3], pre["t1_paths"][1]]
    assert sub["params"] is pre["params"] and len(pre["subjects"]) == 4  # input untouched
    net = _save_tiny_classifier(tmp_path / "model.pt")
    methods = ["gradient", "gradcam"]
    run_saliency(
        tmp_path / "preproc.pt",
        tmp_path / "model.pt",
        tmp_path / "sal",
        subjects="sub-03,sub-01",
        methods=methods,
        layer="features.1",
        device="cpu",
        progress=False,
    )
    for i in (3, 1):
        maps = {
            m: BaselineExplainer(net, m, layer="features.1" if m == "gradcam" else None)
            .attribute(pre["images"][i : i + 1])[0]
            .sum(0)
            .numpy()
            for m in methods
        }
        write_subject_maps(maps, pre, i, tmp_path / "alone")
        for m in methods:
            name = map_path(tmp_path / "alone", pre["subjects"][i], m, "saliency")
            got = nib.load(map_path(tmp_path / "sal", pre["subjects"][i], m, "saliency"))
            assert np.array_equal(got.get_fdata(), nib.load(name).get_fdata()), (i, m)
    assert not (tmp_path / "sal" / "sub-00").exists()


def test_every_stage_selects_subjects_by_one_rule(tmp_path):
    """saliency / simulate, SACV / XNN and the evaluation pick the same subjects of a split."""
    import pandas as pd

    from neuroexplain.concepts3d.run import subject_indices
    from neuroexplain.errors import InputError
    from neuroexplain.evaluate.harness import parse_subjects
    from neuroexplain.stage import select_subjects as shared

    subs = ["sub-a", "sub-b", "sub-c", "sub-d"]
    split = tmp_path / "split.tsv"
    split.write_text(
        "subject\tsplit\ty\nsub-a\ttrain\t0\nsub-b\ttest\t1\nsub-c\tval\t0\nsub-d\ttest\t1\n"
    )
    table = pd.DataFrame(
        {"subject": subs, "index": range(4), "split": ["train", "test", "val", "test"]}
    )
    for spec, want in (("test", [1, 3]), ("val,test", [1, 2, 3]), ("all", [0, 1, 2, 3])):
        assert select_subjects(spec, subs, split=split) == want, spec
        assert subject_indices(table, spec).tolist() == want, spec
        assert shared(spec, subs, table["split"].tolist()) == want, spec
        picked = parse_subjects(str(split), split=spec)
        assert picked == [subs[i] for i in want], spec
    assert select_subjects("d,sub-a", subs) == subject_indices(table, "d,sub-a").tolist() == [3, 0]
    with pytest.raises(InputError, match=r"split\.tsv: no subjects of the 'test' split"):
        select_subjects("test", ["sub-x"], split=split)
    with pytest.raises(InputError, match="needs a split"):
        subject_indices(table.assign(split="all"), "test")
    with pytest.raises(InputError, match="no subjects in split 'foo'"):
        parse_subjects(str(split), split="foo")
