"""``neuroexplain ingest-st``: counts + spots / .h5ad / Visium -> the standard .h5ad."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from neuroexplain.cli import main
from neuroexplain.errors import InputError
from neuroexplain.provenance import sha256_file
from neuroexplain.st import COUNTS_LAYER, INGEST_KEY, LABELLED_KEY, SPATIAL_KEY
from neuroexplain.st.ingest import ingest_st

N_SPOTS, N_GENES = 6, 5
SPOT_IDS = [f"AACG{i:02d}" for i in range(N_SPOTS)]
GENES = [f"Gene{i}" for i in range(N_GENES)]
LABELS = ["GCL", "GCL", "MCL", "", "ONL", "MCL"]


def _counts() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(rng.poisson(3.0, (N_SPOTS, N_GENES)), index=SPOT_IDS, columns=GENES)


def _spots() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "x": rng.uniform(0, 30, N_SPOTS).round(3),
            "y": rng.uniform(0, 30, N_SPOTS).round(3),
            "region": LABELS,
            "batch": ["a"] * N_SPOTS,
        },
        index=pd.Index(SPOT_IDS, name="barcode"),
    )


def _write_inputs(
    tmp_path: Path,
    counts: pd.DataFrame | None = None,
    spots: pd.DataFrame | None = None,
    *,
    counts_name: str = "counts.csv",
    spots_name: str = "spots.csv",
) -> tuple[Path, Path]:
    counts = _counts() if counts is None else counts
    spots = _spots() if spots is None else spots
    cpath, spath = tmp_path / counts_name, tmp_path / spots_name
    counts.to_csv(cpath, sep="\t" if ".tsv" in counts_name else ",")
    spots.to_csv(spath, sep="\t" if ".tsv" in spots_name else ",")
    return cpath, spath


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


# ------------------------------------------------------------------------------------------
# real data: the mouse olfactory bulb (Stahl 2016, replicate 11)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mob_h5ad(mob_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mob") / "mob.h5ad"
    rc = main(
        [
            "ingest-st",
            "--out",
            str(out),
            "--counts",
            str(mob_root / "mob_rep11_counts.csv.gz"),
            "--spots",
            str(mob_root / "mob_rep11_spots.csv"),
            "--label-key",
            "layer_short",
        ]
    )
    assert rc == 0
    return out


def test_mob_acceptance(mob_h5ad: Path, mob_root: Path) -> None:
    import scanpy as sc

    adata = sc.read_h5ad(mob_h5ad)
    assert adata.shape == (262, 15928)
    assert sparse.issparse(adata.X) and adata.X.format == "csr"
    assert sparse.issparse(adata.layers[COUNTS_LAYER])
    assert (adata.X != adata.layers[COUNTS_LAYER]).nnz == 0
    # counts identical to the table (independent read with pandas)
    ref = pd.read_csv(mob_root / "mob_rep11_counts.csv.gz", index_col=0)
    assert list(adata.obs_names) == list(ref.index)
    assert list(adata.var_names) == list(ref.columns)
    np.testing.assert_array_equal(_dense(adata.layers[COUNTS_LAYER]), ref.to_numpy())
    # coordinates and layers
    spots = pd.read_csv(mob_root / "mob_rep11_spots.csv", index_col=0).loc[adata.obs_names]
    assert adata.obsm[SPATIAL_KEY].shape == (262, 2)
    np.testing.assert_array_equal(adata.obsm[SPATIAL_KEY], spots[["x", "y"]].to_numpy())
    layer = adata.obs["layer_short"]
    assert isinstance(layer.dtype, pd.CategoricalDtype)
    assert layer.value_counts().to_dict() == {"GCL": 66, "EPL": 59, "GL": 50, "ONL": 47, "MCL": 38}
    assert int(layer.isna().sum()) == 2
    np.testing.assert_array_equal(adata.obs[LABELLED_KEY].to_numpy(), layer.notna().to_numpy())
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    info = adata.uns[INGEST_KEY]
    assert info["label_key"] == "layer_short"
    assert info["summary"]["n_labelled"] == 260
    sums = dict(
        zip(info["params"]["inputs"]["paths"], info["params"]["inputs"]["sha256"], strict=True)
    )
    assert sums[str(mob_root / "mob_rep11_counts.csv.gz")] == sha256_file(
        mob_root / "mob_rep11_counts.csv.gz"
    )
    assert info["params"]["version"]


# ------------------------------------------------------------------------------------------
# small generated inputs
# ------------------------------------------------------------------------------------------


def test_both_orientations_give_the_same_data(tmp_path: Path) -> None:
    cpath, spath = _write_inputs(tmp_path)
    tpath = tmp_path / "counts_t.tsv.gz"
    with gzip.open(tpath, "wt") as fh:
        _counts().T.to_csv(fh, sep="\t")
    a = ingest_st(tmp_path / "a.h5ad", counts=cpath, spots=spath, label_key="region")
    b = ingest_st(tmp_path / "b.h5ad", counts=tpath, spots=spath, label_key="region")
    c = ingest_st(None, counts=tpath, spots=spath, label_key="region", orientation="genes-by-spots")
    assert a.uns[INGEST_KEY]["summary"]["orientation"] == "spots-by-genes"
    assert b.uns[INGEST_KEY]["summary"]["orientation"] == "genes-by-spots"
    for other in (b, c):
        assert list(other.obs_names) == SPOT_IDS and list(other.var_names) == GENES
        np.testing.assert_array_equal(_dense(other.X), _counts().to_numpy())
        np.testing.assert_array_equal(other.obsm[SPATIAL_KEY], a.obsm[SPATIAL_KEY])
    # labels: empty label -> missing + not labelled; other columns kept
    assert a.obs["region"].isna().tolist() == [lab == "" for lab in LABELS]
    assert a.obs[LABELLED_KEY].tolist() == [lab != "" for lab in LABELS]
    assert a.obs["batch"].tolist() == ["a"] * N_SPOTS
    # the wrong explicit orientation finds no spots
    with pytest.raises(InputError, match="no spot ids in common"):
        ingest_st(None, counts=tpath, spots=spath, label_key="region", orientation="spots-by-genes")


def test_orientation_ambiguous(tmp_path: Path) -> None:
    # a square table whose ids match the spot table on neither axis: auto cannot decide
    square = pd.DataFrame(
        np.ones((3, 3), dtype=int), index=["r0", "r1", "r2"], columns=["c0", "c1", "c2"]
    )
    spots = _spots().iloc[:3]
    cpath, spath = _write_inputs(tmp_path, counts=square, spots=spots)
    with pytest.raises(InputError, match="cannot tell the orientation"):
        ingest_st(None, counts=cpath, spots=spath, label_key="region")


def test_deterministic(tmp_path: Path) -> None:
    cpath, spath = _write_inputs(tmp_path)
    outs = [tmp_path / "r1.h5ad", tmp_path / "r2.h5ad"]
    for out in outs:
        ingest_st(out, counts=cpath, spots=spath, label_key="region")
    a, b = (ad.read_h5ad(p) for p in outs)
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    np.testing.assert_array_equal(a.obsm[SPATIAL_KEY], b.obsm[SPATIAL_KEY])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.uns[INGEST_KEY]["params"]["config_hash"] == b.uns[INGEST_KEY]["params"]["config_hash"]


def test_h5ad_round_trip(tmp_path: Path) -> None:
    cpath, spath = _write_inputs(tmp_path)
    first = ingest_st(tmp_path / "first.h5ad", counts=cpath, spots=spath, label_key="region")
    again = ingest_st(tmp_path / "again.h5ad", h5ad=tmp_path / "first.h5ad", label_key="region")
    np.testing.assert_array_equal(_dense(again.layers[COUNTS_LAYER]), _dense(first.X))
    np.testing.assert_array_equal(again.obsm[SPATIAL_KEY], first.obsm[SPATIAL_KEY])
    pd.testing.assert_series_equal(again.obs["region"], first.obs["region"])
    assert again.uns[INGEST_KEY]["summary"]["source"] == "h5ad"


def test_h5ad_counts_sources_and_obs_coordinates(tmp_path: Path) -> None:
    counts, spots = _counts(), _spots()
    obs = spots.rename(columns={"region": "layer"})
    obs.index.name = None
    # integer .X, coordinates in .obs x / y
    plain = ad.AnnData(X=counts.to_numpy().astype(np.int64), obs=obs, var=pd.DataFrame(index=GENES))
    plain.write_h5ad(tmp_path / "plain.h5ad")
    got = ingest_st(None, h5ad=tmp_path / "plain.h5ad")
    np.testing.assert_array_equal(got.obsm[SPATIAL_KEY], spots[["x", "y"]].to_numpy())
    np.testing.assert_array_equal(_dense(got.X), counts.to_numpy())
    # normalised .X with the raw counts in .raw
    norm = plain.copy()
    norm.raw = plain.copy()
    norm.X = np.log1p(counts.to_numpy() / 7.0)
    norm.obsm["spatial"] = spots[["x", "y"]].to_numpy()
    norm.write_h5ad(tmp_path / "norm.h5ad")
    got = ingest_st(None, h5ad=tmp_path / "norm.h5ad")
    np.testing.assert_array_equal(_dense(got.X), counts.to_numpy())
    # normalised .X and nothing else -> error naming .X
    del norm.raw
    norm.write_h5ad(tmp_path / "norm_only.h5ad")
    with pytest.raises(InputError, match=r"norm_only\.h5ad: \.X.*non-integer counts"):
        ingest_st(None, h5ad=tmp_path / "norm_only.h5ad")


def test_partial_overlap_intersects_with_warning(tmp_path: Path, caplog) -> None:
    spots = _spots().iloc[1:]  # the spot table lacks the first spot
    cpath, spath = _write_inputs(
        tmp_path,
        spots=pd.concat(
            [
                spots,
                pd.DataFrame(
                    {"x": [1.0], "y": [2.0], "region": ["GL"], "batch": ["a"]},
                    index=pd.Index(["EXTRA"], name="barcode"),
                ),
            ]
        ),
    )
    with caplog.at_level("WARNING"):
        got = ingest_st(None, counts=cpath, spots=spath, label_key="region")
    assert list(got.obs_names) == SPOT_IDS[1:]
    assert got.uns[INGEST_KEY]["summary"]["n_spots_dropped"] == 1
    assert got.uns[INGEST_KEY]["summary"]["n_spot_rows_ignored"] == 1
    assert "dropped" in caplog.text
    with pytest.raises(InputError, match="spot ids differ"):
        ingest_st(None, counts=cpath, spots=spath, label_key="region", on_mismatch="error")


def _write_visium(folder: Path, counts: pd.DataFrame, genes: list[str]) -> np.ndarray:
    """A minimal Space Ranger folder (v3 h5 matrix, positions list, scale factors, 2 images)."""
    import h5py
    from matplotlib.image import imsave

    (folder / "spatial").mkdir(parents=True)
    csc = sparse.csc_matrix(counts.to_numpy().T)  # genes x spots, columns = barcodes
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"lib1"])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["software_version"] = "spaceranger-2.0.0"
        m = f.create_group("matrix")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        m["barcodes"] = np.array(list(counts.index), dtype="S")
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSMUSG{i:05d}" for i in range(len(genes))], dtype="S")
        feats["name"] = np.array(genes, dtype="S")
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        feats["genome"] = np.array([b"mm10"] * len(genes))
    pixels = np.arange(len(counts) * 2).reshape(-1, 2) * 10 + 100
    pos = pd.DataFrame(
        {
            "in_tissue": 1,
            "array_row": range(len(counts)),
            "array_col": range(len(counts)),
            "pxl_row": pixels[:, 0],
            "pxl_col": pixels[:, 1],
        },
        index=counts.index,
    )
    pos.to_csv(folder / "spatial" / "tissue_positions_list.csv", header=False)
    (folder / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": 89.4,
                "tissue_hires_scalef": 0.17,
                "fiducial_diameter_fullres": 144.4,
                "tissue_lowres_scalef": 0.05,
            }
        )
    )
    img = np.zeros((4, 4, 3), dtype=np.float32)
    imsave(folder / "spatial" / "tissue_hires_image.png", img)
    imsave(folder / "spatial" / "tissue_lowres_image.png", img)
    # scanpy's obsm["spatial"] is (pxl_col_in_fullres, pxl_row_in_fullres) = the last two columns
    return pixels[:, ::-1].astype(np.float64)


def test_visium_folder(tmp_path: Path) -> None:
    genes = [*GENES[:-1], GENES[0]]  # a duplicated symbol, as in real 10x output
    expected_xy = _write_visium(tmp_path / "visium", _counts(), genes)
    labels = _spots()[["region"]]
    labels.to_csv(tmp_path / "labels.csv")
    got = ingest_st(
        tmp_path / "v.h5ad",
        visium=tmp_path / "visium",
        spots=tmp_path / "labels.csv",
        label_key="region",
    )
    assert got.shape == (N_SPOTS, N_GENES) and got.var_names.is_unique
    assert got.var["gene_ids"].tolist()[0] == "ENSMUSG00000"
    np.testing.assert_array_equal(_dense(got.layers[COUNTS_LAYER]), _counts().to_numpy())
    np.testing.assert_array_equal(got.obsm[SPATIAL_KEY], expected_xy)
    assert got.obs[LABELLED_KEY].tolist() == [lab != "" for lab in LABELS]
    assert "lib1" in got.uns["spatial"]
    assert ad.read_h5ad(tmp_path / "v.h5ad").uns[INGEST_KEY]["summary"]["source"] == "visium"
    # without a spot table: every spot unlabelled
    bare = ingest_st(None, visium=tmp_path / "visium")
    assert not bare.obs[LABELLED_KEY].any()
    (tmp_path / "visium" / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputError, match=r"scalefactors_json\.json"):
        ingest_st(None, visium=tmp_path / "visium")


# ------------------------------------------------------------------------------------------
# bad inputs: one-line error naming the file, exit code 2, nothing written
# ------------------------------------------------------------------------------------------


def _bad_dup_gene(tmp: Path) -> tuple[list[str], str, str]:
    c = _counts()
    c.columns = [*GENES[:-1], GENES[0]]
    cpath, spath = _write_inputs(tmp, counts=c)
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "duplicated gene names"


def _bad_dup_spot_counts(tmp: Path) -> tuple[list[str], str, str]:
    c = _counts()
    c.index = [*SPOT_IDS[:-1], SPOT_IDS[0]]
    cpath, spath = _write_inputs(tmp, counts=c)
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "duplicated spot ids"


def _bad_dup_spot_table(tmp: Path) -> tuple[list[str], str, str]:
    s = _spots()
    s.index = pd.Index([*SPOT_IDS[:-1], SPOT_IDS[0]], name="barcode")
    cpath, spath = _write_inputs(tmp, spots=s)
    return ["--counts", str(cpath), "--spots", str(spath)], spath.name, "duplicated spot ids"


def _bad_no_overlap(tmp: Path) -> tuple[list[str], str, str]:
    s = _spots()
    s.index = pd.Index([f"OTHER{i}" for i in range(N_SPOTS)], name="barcode")
    cpath, spath = _write_inputs(tmp, spots=s)
    return ["--counts", str(cpath), "--spots", str(spath)], spath.name, "no spot ids in common"


def _bad_no_xy(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp, spots=_spots().drop(columns=["y"]))
    return ["--counts", str(cpath), "--spots", str(spath)], spath.name, "no coordinates"


def _bad_h5ad_no_spatial(tmp: Path) -> tuple[list[str], str, str]:
    a = ad.AnnData(
        X=_counts().to_numpy().astype(np.float32),
        obs=pd.DataFrame({"layer": ["A"] * N_SPOTS}, index=SPOT_IDS),
        var=pd.DataFrame(index=GENES),
    )
    a.write_h5ad(tmp / "nospatial.h5ad")
    return ["--h5ad", str(tmp / "nospatial.h5ad")], "nospatial.h5ad", "no coordinates"


def _bad_negative(tmp: Path) -> tuple[list[str], str, str]:
    c = _counts()
    c.iloc[2, 3] = -1
    cpath, spath = _write_inputs(tmp, counts=c)
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "negative counts"


def _bad_fraction(tmp: Path) -> tuple[list[str], str, str]:
    c = _counts().astype(float)
    c.iloc[1, 1] = 2.5
    cpath, spath = _write_inputs(tmp, counts=c, counts_name="counts.tsv")
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "non-integer counts"


def _bad_nan(tmp: Path) -> tuple[list[str], str, str]:
    c = _counts().astype(float)
    c.iloc[4, 0] = np.nan
    cpath, spath = _write_inputs(tmp, counts=c)
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "missing (NaN) counts"


def _bad_text_count(tmp: Path) -> tuple[list[str], str, str]:
    c = _counts().astype(object)
    c.iloc[0, 2] = "many"
    cpath, spath = _write_inputs(tmp, counts=c)
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "non-numeric count"


def _bad_empty_header_only(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp)
    cpath.write_text("," + ",".join(GENES) + "\n")
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "empty table"


def _bad_empty_file(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp)
    cpath.write_text("")
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "empty table"


def _bad_no_label(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp)
    return (
        ["--counts", str(cpath), "--spots", str(spath), "--label-key", "layer"],
        spath.name,
        "label column 'layer' not found",
    )


def _bad_coordinate_text(tmp: Path) -> tuple[list[str], str, str]:
    s = _spots().astype({"x": object})
    s.iloc[3, 0] = "left"
    cpath, spath = _write_inputs(tmp, spots=s)
    return ["--counts", str(cpath), "--spots", str(spath)], spath.name, "non-numeric coordinate"


def _bad_corrupt_gz(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp)
    gz = tmp / "counts.csv.gz"
    gz.write_bytes(gzip.compress(cpath.read_bytes())[:40])  # truncated gzip stream
    return ["--counts", str(gz), "--spots", str(spath)], gz.name, "cannot"


def _bad_binary(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp)
    cpath.write_bytes(bytes(range(128, 256)) * 4)
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "cannot"


def _bad_corrupt_h5ad(tmp: Path) -> tuple[list[str], str, str]:
    (tmp / "broken.h5ad").write_bytes(b"not an hdf5 file at all")
    return ["--h5ad", str(tmp / "broken.h5ad")], "broken.h5ad", "cannot read as .h5ad"


def _bad_ragged(tmp: Path) -> tuple[list[str], str, str]:
    cpath, spath = _write_inputs(tmp)
    lines = cpath.read_text().splitlines()
    lines[2] += ",7,8"
    cpath.write_text("\n".join(lines) + "\n")
    return ["--counts", str(cpath), "--spots", str(spath)], cpath.name, "cannot parse"


BAD_INPUTS = {
    "duplicated-gene": _bad_dup_gene,
    "duplicated-spot-counts": _bad_dup_spot_counts,
    "duplicated-spot-table": _bad_dup_spot_table,
    "no-overlap": _bad_no_overlap,
    "no-xy-columns": _bad_no_xy,
    "h5ad-no-spatial": _bad_h5ad_no_spatial,
    "negative": _bad_negative,
    "non-integer": _bad_fraction,
    "nan": _bad_nan,
    "text-count": _bad_text_count,
    "header-only": _bad_empty_header_only,
    "empty-file": _bad_empty_file,
    "label-absent": _bad_no_label,
    "coordinate-text": _bad_coordinate_text,
    "corrupt-gz": _bad_corrupt_gz,
    "binary": _bad_binary,
    "corrupt-h5ad": _bad_corrupt_h5ad,
    "ragged-row": _bad_ragged,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_cli(case: str, tmp_path: Path, capsys) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    args, filename, problem = BAD_INPUTS[case](inputs)
    out_dir = tmp_path / "out"
    out = out_dir / "st.h5ad"
    if "--label-key" not in args:
        args += ["--label-key", "region" if "--h5ad" not in args else "layer"]
    rc = main(["ingest-st", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert filename in lines[0] and problem in lines[0], lines[0]
    assert not out.exists()
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_good_input_cli_writes(tmp_path: Path) -> None:
    cpath, spath = _write_inputs(tmp_path)
    out = tmp_path / "out" / "st.h5ad"
    rc = main(
        [
            "ingest-st",
            "--out",
            str(out),
            "--counts",
            str(cpath),
            "--spots",
            str(spath),
            "--label-key",
            "region",
            "--label-out-key",
            "layer",
        ]
    )
    assert rc == 0
    got = ad.read_h5ad(out)
    assert got.uns[INGEST_KEY]["label_key"] == "layer"
    assert got.obs["layer"].isna().sum() == LABELS.count("")
    assert [p.name for p in out.parent.iterdir()] == ["st.h5ad"]
