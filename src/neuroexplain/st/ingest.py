"""Spatial transcriptomics ingest: counts + coordinates + region labels -> one standard ``.h5ad``.

Three kinds of input are accepted (exactly one of them per call):

(a) a **counts table** (CSV / TSV, optionally gzipped; the separator is taken from the extension and
    checked against the header line) plus a **spot table** (CSV / TSV: spot id in the first column
    or ``spot_col``, coordinate columns ``x_col`` / ``y_col``, a label column ``label_key``). The
    counts table may be spots x genes or genes x spots; ``orientation="auto"`` decides by matching
    the table's row ids and column names against the spot table's ids (the axis with more matches
    holds the spots; on a tie the axis whose length equals the number of spots in the spot table,
    if exactly one does; otherwise an error asks for ``--orientation``). The first column holds the
    row ids; a header without the corner cell (R ``write.table`` style) is accepted.
(b) an existing **.h5ad**: raw counts from ``.layers["counts"]``, else ``.raw.X``, else ``.X``;
    whichever is used must hold non-negative integers. Coordinates from ``.obsm["spatial"]``, else
    the ``.obs`` columns ``x_col`` / ``y_col``, else the spot table. Labels from the spot table if
    one is given, else ``.obs[label_key]``.
(c) a **10x Visium** (Space Ranger) folder, read with :func:`scanpy.read_visium`
    (``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions(_list).csv``,
    ``spatial/scalefactors_json.json`` and the two tissue images). Gene symbols in 10x output are
    not unique by design; they are made unique (``var_names_make_unique``, the Ensembl ids stay in
    ``.var["gene_ids"]``). Labels come from an optional spot table (e.g. a Loupe export); without
    one every spot is unlabelled (a warning says so).

Spot-id mismatches between counts and spot table: no common id at all is an error. With
``on_mismatch="intersect"`` (default), a partial overlap is allowed with a warning: counts spots
that the spot table lacks are dropped when the spot table is the coordinate source (they cannot be
placed) and kept unlabelled when it only supplies labels; spot-table rows without counts are
ignored. ``on_mismatch="error"`` makes any mismatch an error. Counts in the summary record what
was dropped.

Unlabelled spots (empty, ``NA``, ``NaN``, ``None`` or ``null`` label) are kept, with a missing
label and ``.obs["labelled"] == False``. ``label_key=""`` (or ``None``) ingests without labels.
Label values, and gene names, that differ only by case or whitespace (``GCL`` / ``gcl``,
``Penk`` / ``PENK``) are refused: a typo would otherwise become a layer (or a gene) of its own.

Every problem with the inputs raises :class:`~neuroexplain.errors.InputError` naming the file and
the problem, before anything is written; the output is written atomically.

Reference: the mouse olfactory bulb demo data are Stahl et al., "Visualization and analysis of gene
expression in tissue sections by spatial transcriptomics", Science 353:78 (2016); the layout follows
scanpy / squidpy conventions (Wolf et al., Genome Biology 19:15, 2018; Palla et al., Nature Methods
19:171, 2022).

Example:
    >>> adata = ingest_st(  # doctest: +SKIP
    ...     "results/ingest/mob.h5ad",
    ...     counts="mob_rep11_counts.csv.gz", spots="mob_rep11_spots.csv",
    ...     label_key="layer_short",
    ... )
    >>> adata.obs["layer_short"].value_counts()["GCL"]  # doctest: +SKIP
    66
"""

from __future__ import annotations

import csv
import gzip
import logging
import warnings
import zlib
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from neuroexplain.errors import InputError
from neuroexplain.io.atomic import write_h5ad
from neuroexplain.st._keys import (
    COUNTS_LAYER,
    DEFAULT_LABEL_KEY,
    INGEST_KEY,
    LABELLED_KEY,
    SPATIAL_KEY,
)
from neuroexplain.utils import case_clashes

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["MISMATCH_POLICIES", "ORIENTATIONS", "ingest_st"]

log = logging.getLogger(__name__)

ORIENTATIONS = ("auto", "spots-by-genes", "genes-by-spots")
MISMATCH_POLICIES = ("intersect", "error")

_MISSING_LABELS = frozenset({"", "na", "nan", "none", "null", "<na>"})
_FLOAT32_EXACT = 2**24  # integers up to this are exact in float32
_SEP_NAMES = {",": "comma", "\t": "tab"}
_VISIUM_COUNT_FILE = "filtered_feature_bc_matrix.h5"

PathArg = str | PathLike[str]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _examples(values: Any, n: int = 3) -> str:
    vals = [str(v) for v in list(values)[:n]]
    more = len(values) - len(vals)
    return repr(vals)[:-1] + (f", ... {more} more]" if more > 0 else "]")


def _check_file(path: PathArg, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(p, f"{what} not found")
    if not p.is_file():
        raise InputError(p, f"expected a {what} file, got a directory")
    return p


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _first_line(path: Path) -> str:
    try:
        if _is_gzip(path):
            with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
                return fh.readline()
        with open(path, encoding="utf-8", newline="") as fh:
            return fh.readline()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the file: {exc}") from exc


def _detect_sep(path: Path, first_line: str) -> str:
    """Separator from the extension (``.csv`` / ``.tsv`` / ``.tab``), checked against the header."""
    name = path.name.lower()
    for comp in (".gz", ".bz2", ".xz", ".zip"):
        name = name.removesuffix(comp)
    if name.endswith((".tsv", ".tab")):
        sep = "\t"
    elif name.endswith(".csv"):
        sep = ","
    elif "\t" in first_line:
        sep = "\t"
    elif "," in first_line:
        sep = ","
    else:
        raise InputError(
            path, "cannot tell the column separator: expected a comma- or tab-separated table"
        )
    other = "\t" if sep == "," else ","
    if sep not in first_line and other in first_line:
        log.warning(
            "%s: header line has no %s but has %s separators; reading it as %s-separated",
            path,
            _SEP_NAMES[sep],
            _SEP_NAMES[other],
            _SEP_NAMES[other],
        )
        sep = other
    return sep


def _parse_header(line: str, sep: str) -> list[str]:
    return next(csv.reader([line.rstrip("\r\n")], delimiter=sep))


def _read_csv(path: Path, sep: str, **kwargs: Any) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path, sep=sep, compression="gzip" if _is_gzip(path) else "infer", **kwargs
        )
    except pd.errors.EmptyDataError as exc:
        raise InputError(path, "empty table: no data rows") from exc
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # ParserError, Unicode, gzip
        raise InputError(
            path, f"cannot parse as a {_SEP_NAMES[sep]}-separated table: {exc}".rstrip()
        ) from exc


def _duplicates(index: pd.Index) -> pd.Index:
    return index[index.duplicated()].unique()


def _is_missing_label(values: pd.Series) -> np.ndarray:
    text = values.astype(str).str.strip().str.lower()
    return (values.isna() | text.isin(_MISSING_LABELS)).to_numpy()


# --------------------------------------------------------------------------------------------
# counts validation
# --------------------------------------------------------------------------------------------


def _check_counts(
    matrix: np.ndarray | sparse.spmatrix | sparse.sparray,
    path: PathArg,
    obs_names: pd.Index,
    var_names: pd.Index,
    *,
    where: str = "",
) -> None:
    """Raise if ``matrix`` (spots x genes) is not finite, non-negative and integer-valued."""
    prefix = f"{where}: " if where else ""
    if sparse.issparse(matrix):
        csr = sparse.csr_matrix(matrix)
        data = csr.data
    else:
        csr = None
        data = np.asarray(matrix)
    if data.dtype.kind not in "iuf":
        raise InputError(path, f"{prefix}expected numeric counts, got dtype {data.dtype}")

    def locate(bad: np.ndarray) -> str:
        k = int(np.flatnonzero(bad.ravel())[0])
        if csr is not None:
            row = int(np.searchsorted(csr.indptr, k, side="right") - 1)
            col = int(csr.indices[k])
        else:
            row, col = np.unravel_index(k, data.shape)
        value = data.ravel()[k].item()
        return f"{value!r} at spot {obs_names[row]!r}, gene {var_names[col]!r}"

    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_nan = int(np.isnan(data).sum())
            kind = "missing (NaN)" if n_nan else "infinite"
            raise InputError(
                path,
                f"{prefix}{kind} counts: {int((~finite).sum())} value(s), first "
                f"{locate(~finite)}; expected raw integer counts",
            )
    negative = data < 0
    if negative.any():
        raise InputError(
            path,
            f"{prefix}negative counts: {int(negative.sum())} value(s), first {locate(negative)}; "
            "expected raw integer counts",
        )
    if data.dtype.kind == "f":
        fractional = data != np.floor(data)
        if fractional.any():
            raise InputError(
                path,
                f"{prefix}non-integer counts: {int(fractional.sum())} value(s), first "
                f"{locate(fractional)}; expected raw UMI counts, not normalised values",
            )


def _to_csr(matrix: np.ndarray | sparse.spmatrix | sparse.sparray) -> sparse.csr_matrix:
    """Raw counts as CSR float32 (float64 if a count exceeds float32's exact-integer range)."""
    csr = sparse.csr_matrix(matrix)
    top = csr.data.max() if csr.nnz else 0
    dtype = np.float32 if top <= _FLOAT32_EXACT else np.float64
    if dtype is np.float64:
        log.warning("counts up to %d exceed float32's exact range; storing float64", top)
    csr = csr.astype(dtype)
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def _check_names(path: PathArg, names: pd.Index, what: str, *, where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    if names.isna().any() or (names.astype(str).str.strip() == "").any():
        raise InputError(path, f"{prefix}empty or missing {what}")
    dup = _duplicates(names)
    if len(dup):
        raise InputError(path, f"{prefix}duplicated {what}: {_examples(dup)}")


def _check_gene_case(path: PathArg, names: pd.Index, what: str) -> None:
    """Refuse gene names that differ only by case or whitespace (``Penk`` / ``PENK``)."""
    clashes = case_clashes(names)
    if clashes:
        more = f" (and {len(clashes) - 1} more such group(s))" if len(clashes) > 1 else ""
        raise InputError(
            path,
            f"{what} that differ only by case or whitespace: "
            f"{' vs '.join(map(repr, clashes[0]))}{more}; keep one spelling (sum or drop the "
            "others) before ingesting",
        )


def _check_label_case(labels: pd.Series, path: PathArg, key: str) -> None:
    """Refuse label values that differ only by case or whitespace (``GCL`` / ``gcl``)."""
    present = labels[~_is_missing_label(labels)].astype(str)
    clashes = case_clashes(present.unique())
    if clashes:
        counts = present.value_counts()
        more = f" (and {len(clashes) - 1} more such group(s))" if len(clashes) > 1 else ""
        raise InputError(
            path,
            f"label column {key!r} has values that differ only by case or whitespace: "
            + " vs ".join(f"{v!r} ({int(counts[v])} spot(s))" for v in clashes[0])
            + f"{more}; write each label one way (or as clearly different labels)",
        )


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


@dataclass
class _Parts:
    """What a reader delivers; ``coords`` / ``labels`` may be filled later from the spot table."""

    source: str
    X: sparse.csr_matrix  # (n_spots, n_genes) raw counts
    obs: pd.DataFrame  # index = spot ids; extra per-spot columns
    var: pd.DataFrame  # index = gene names
    inputs: list[Path]
    coords: np.ndarray | None = None  # (n_spots, 2)
    labels: pd.Series | None = None
    uns: dict[str, Any] = field(default_factory=dict)
    orientation: str | None = None
    n_dropped: int = 0
    n_ignored: int = 0

    def subset(self, keep: np.ndarray) -> None:
        self.X = self.X[keep]
        self.obs = self.obs.loc[keep]
        if self.coords is not None:
            self.coords = self.coords[keep]
        if self.labels is not None:
            self.labels = self.labels.loc[keep]


def _resolve_orientation(
    path: Path, rows: pd.Index, cols: pd.Index, spot_ids: pd.Index, orientation: str
) -> str:
    if orientation != "auto":
        return orientation
    in_rows = int(rows.isin(spot_ids).sum())
    in_cols = int(cols.isin(spot_ids).sum())
    if in_rows > in_cols:
        return "spots-by-genes"
    if in_cols > in_rows:
        return "genes-by-spots"
    n = len(spot_ids)
    if len(rows) == n and len(cols) != n:
        return "spots-by-genes"
    if len(cols) == n and len(rows) != n:
        return "genes-by-spots"
    raise InputError(
        path,
        f"cannot tell the orientation: {in_rows} row ids and {in_cols} column names match spot "
        f"ids of the spot table (table is {len(rows)} x {len(cols)}, {n} spots); "
        "pass --orientation spots-by-genes or genes-by-spots",
    )


def _read_counts_table(path: PathArg, spot_ids: pd.Index, orientation: str) -> _Parts:
    """Counts table (spots x genes or genes x spots) -> raw counts, spots x genes."""
    path = _check_file(path, "counts table")
    line = _first_line(path)
    if not line.strip():
        raise InputError(path, "empty table: no header line")
    sep = _detect_sep(path, line)
    header = _parse_header(line, sep)
    df = _read_csv(
        path, sep, header=None, skiprows=1, index_col=0, converters={0: str}, low_memory=False
    )
    n_values = df.shape[1]
    if len(header) == n_values + 1:
        names = header[1:]
    elif len(header) == n_values:  # R write.table style: no corner cell
        names = header
    else:
        raise InputError(
            path,
            f"header has {len(header)} fields but the data rows have {n_values + 1} "
            f"(row id + {n_values} values)",
        )
    if df.shape[0] == 0 or n_values == 0:
        raise InputError(path, f"empty table: {df.shape[0]} rows x {n_values} value columns")
    rows = pd.Index(df.index, dtype=object)
    cols = pd.Index([str(c) for c in names], dtype=object)
    if rows.isna().any():
        bad = int(np.flatnonzero(rows.isna())[0]) + 2
        raise InputError(path, f"empty or missing row id on line {bad}")

    numeric = [
        pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt) for dt in df.dtypes
    ]
    if not all(numeric):
        j = numeric.index(False)
        col = df.iloc[:, j]
        parsed = pd.to_numeric(col, errors="coerce")
        i = int(np.flatnonzero((parsed.isna() & col.notna()).to_numpy())[0])
        raise InputError(
            path,
            f"non-numeric count {col.iloc[i]!r} at row {rows[i]!r}, column {cols[j]!r}",
        )

    resolved = _resolve_orientation(path, rows, cols, spot_ids, orientation)
    values = df.to_numpy()
    del df
    if resolved == "spots-by-genes":
        spots, genes = rows, cols
    else:
        spots, genes, values = cols, rows, values.T
    spot_word = "row ids" if resolved == "spots-by-genes" else "column names"
    _check_names(path, spots, f"spot ids ({spot_word})")
    _check_names(path, genes, "gene names")
    _check_gene_case(path, genes, "gene names")
    _check_counts(values, path, spots, genes)
    log.info("%s: %d spots x %d genes (%s)", path, len(spots), len(genes), resolved)
    return _Parts(
        source="table",
        X=_to_csr(values),
        obs=pd.DataFrame(index=spots),
        var=pd.DataFrame(index=genes),
        inputs=[path],
        orientation=resolved,
    )


def _read_spot_table(path: PathArg, spot_col: str | None) -> pd.DataFrame:
    """Spot table -> DataFrame of strings indexed by spot id (the id column removed)."""
    path = _check_file(path, "spot table")
    line = _first_line(path)
    if not line.strip():
        raise InputError(path, "empty table: no header line")
    sep = _detect_sep(path, line)
    raw = _read_csv(path, sep, header=None, dtype=str, keep_default_na=False)
    header = [str(h).strip() for h in raw.iloc[0]]
    body = raw.iloc[1:]
    if body.shape[0] == 0:
        raise InputError(path, "empty table: a header but no spots")
    dup = _duplicates(pd.Index(header))
    if len(dup):
        raise InputError(path, f"duplicated column names: {_examples(dup)}")
    body.columns = header
    id_col = header[0] if spot_col is None else spot_col
    if id_col not in header:
        raise InputError(path, f"spot id column {id_col!r} not found (columns: {header})")
    ids = pd.Index(body[id_col].str.strip(), dtype=object)
    _check_names(path, ids, "spot ids")
    table = body.drop(columns=[id_col])
    table.index = ids
    return table


def _coords_from_table(table: pd.DataFrame, path: PathArg, x_col: str, y_col: str) -> pd.DataFrame:
    missing = [c for c in (x_col, y_col) if c not in table.columns]
    if missing:
        raise InputError(
            path,
            f"no coordinates: column(s) {missing} not found (columns: {list(table.columns)}); "
            "set --x-col / --y-col",
        )
    out = {}
    for col in (x_col, y_col):
        text = table[col].astype(str).str.strip()
        num = pd.to_numeric(text.where(text != ""), errors="coerce")
        empty = (text == "").to_numpy()
        if empty.any():
            spot = table.index[int(np.flatnonzero(empty)[0])]
            raise InputError(
                path,
                f"missing coordinate in column {col!r} for {int(empty.sum())} spot(s), "
                f"first {spot!r}",
            )
        bad = (num.isna() | ~np.isfinite(num.fillna(0))).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                path,
                f"non-numeric coordinate {text.iloc[i]!r} in column {col!r} for spot "
                f"{table.index[i]!r}",
            )
        out[col] = num.astype(np.float64)
    return pd.DataFrame(out, index=table.index)


def _labels_from_table(table: pd.DataFrame, path: PathArg, label_key: str) -> pd.Series:
    if label_key not in table.columns:
        raise InputError(
            path,
            f"label column {label_key!r} not found (columns: {list(table.columns)}); "
            "set --label-key",
        )
    labels = table[label_key].astype(str).str.strip()
    return labels.mask(_is_missing_label(labels))


def _extra_columns(table: pd.DataFrame, skip: set[str]) -> pd.DataFrame:
    """Other spot-table columns for ``.obs``: numeric where every value parses, else categorical."""
    out = {}
    for col in table.columns:
        if col in skip:
            continue
        text = table[col].astype(str).str.strip()
        missing = _is_missing_label(text)
        num = pd.to_numeric(text.mask(missing), errors="coerce")
        if not (num.isna() & ~missing).any() and (~missing).any():
            out[col] = num.astype(np.float64)
        else:
            out[col] = pd.Categorical(text.mask(missing))
    return pd.DataFrame(out, index=table.index)


def _read_h5ad(path: PathArg, x_col: str, y_col: str) -> _Parts:
    import anndata as ad

    path = _check_file(path, ".h5ad")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for bad files
        raise InputError(path, f"cannot read as .h5ad: {type(exc).__name__}: {exc}") from exc
    if COUNTS_LAYER in adata.layers:
        matrix, var, where = adata.layers[COUNTS_LAYER], adata.var, f".layers[{COUNTS_LAYER!r}]"
    elif adata.raw is not None:
        matrix, var, where = adata.raw.X, adata.raw.var, ".raw.X"
    else:
        matrix, var, where = adata.X, adata.var, ".X"
    if matrix is None or adata.n_obs == 0 or var.shape[0] == 0:
        raise InputError(path, f"empty data: {adata.n_obs} spots x {var.shape[0]} genes")
    obs_names = pd.Index(adata.obs_names.astype(str), dtype=object)
    var_names = pd.Index(var.index.astype(str), dtype=object)
    _check_names(path, obs_names, "spot ids (obs_names)")
    _check_names(path, var_names, "gene names (var_names)")
    _check_gene_case(path, var_names, "gene names (var_names)")
    hint = "" if where != ".X" else " (no .layers['counts'] or .raw holding raw counts)"
    _check_counts(matrix, path, obs_names, var_names, where=where + hint)
    log.info(
        "%s: %d spots x %d genes, raw counts from %s", path, len(obs_names), len(var_names), where
    )

    coords = None
    if SPATIAL_KEY in adata.obsm:
        arr = np.asarray(adata.obsm[SPATIAL_KEY])
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "iuf":
            raise InputError(
                path,
                f".obsm[{SPATIAL_KEY!r}]: expected numeric (n_spots, 2) coordinates, got "
                f"shape {arr.shape} dtype {arr.dtype}",
            )
        if arr.shape[1] > 2:
            log.warning(
                "%s: .obsm['spatial'] has %d columns; keeping the first 2", path, arr.shape[1]
            )
        coords = arr[:, :2].astype(np.float64)
    elif x_col in adata.obs and y_col in adata.obs:
        table = adata.obs[[x_col, y_col]].astype(str)
        table.index = obs_names
        coords = _coords_from_table(table, f"{path} (.obs)", x_col, y_col).to_numpy()
    obs = adata.obs.copy()
    obs.index = obs_names
    var = var.copy()
    var.index = var_names
    uns = {}
    if isinstance(adata.uns.get(SPATIAL_KEY), dict):
        uns[SPATIAL_KEY] = adata.uns[SPATIAL_KEY]
    return _Parts(
        source="h5ad", X=_to_csr(matrix), obs=obs, var=var, inputs=[path], coords=coords, uns=uns
    )


def _read_visium(folder: PathArg) -> _Parts:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "expected a 10x Visium (Space Ranger) output folder")
    spatial = folder / "spatial"
    positions = spatial / "tissue_positions.csv"
    if not positions.exists():
        positions = spatial / "tissue_positions_list.csv"
    required = [
        folder / _VISIUM_COUNT_FILE,
        positions,
        spatial / "scalefactors_json.json",
        spatial / "tissue_hires_image.png",
        spatial / "tissue_lowres_image.png",
    ]
    missing = [str(p.relative_to(folder)) for p in required if not p.is_file()]
    if missing:
        raise InputError(folder, f"not a Space Ranger output folder: missing {missing}")
    import scanpy as sc

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = sc.read_visium(folder, count_file=_VISIUM_COUNT_FILE)
    except Exception as exc:  # h5py / PIL / pandas raise many types
        raise InputError(folder, f"cannot read as 10x Visium: {type(exc).__name__}: {exc}") from exc
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(folder, f"empty data: {adata.n_obs} spots x {adata.n_vars} genes")
    if adata.var_names.duplicated().any():
        n = int(adata.var_names.duplicated().sum())
        log.info(
            "%s: %d duplicated gene symbols made unique (gene_ids keep the Ensembl ids)", folder, n
        )
        adata.var_names_make_unique()
    obs_names = pd.Index(adata.obs_names.astype(str), dtype=object)
    var_names = pd.Index(adata.var_names.astype(str), dtype=object)
    count_file = folder / _VISIUM_COUNT_FILE
    _check_names(count_file, obs_names, "spot barcodes")
    _check_counts(adata.X, count_file, obs_names, var_names)
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    missing_xy = ~np.isfinite(coords).all(axis=1)
    if missing_xy.any():
        raise InputError(
            positions,
            f"no coordinates for {int(missing_xy.sum())} spot(s) of {_VISIUM_COUNT_FILE}, "
            f"first {obs_names[int(np.flatnonzero(missing_xy)[0])]!r}",
        )
    obs = adata.obs.copy()
    obs.index = obs_names
    var = adata.var.copy()
    var.index = var_names
    return _Parts(
        source="visium",
        X=_to_csr(adata.X),
        obs=obs,
        var=var,
        inputs=[p for p in required if p.suffix != ".png"],
        coords=coords,
        uns={SPATIAL_KEY: adata.uns[SPATIAL_KEY]},
    )


# --------------------------------------------------------------------------------------------
# spot table alignment and assembly
# --------------------------------------------------------------------------------------------


def _align(
    parts: _Parts,
    table: pd.DataFrame,
    table_path: Path,
    *,
    coords_from_table: bool,
    on_mismatch: str,
) -> pd.DataFrame:
    """Match the spot table to the counts' spots; return the table reindexed to them."""
    ids = parts.obs.index
    in_table = ids.isin(table.index)
    counts_file = parts.inputs[0]
    if not in_table.any():
        raise InputError(
            table_path,
            f"no spot ids in common with {counts_file} (counts spots e.g. {_examples(ids)}, "
            f"spot table e.g. {_examples(table.index)})",
        )
    only_table = table.index[~table.index.isin(ids)]
    n_only_counts = int((~in_table).sum())
    if on_mismatch == "error" and (n_only_counts or len(only_table)):
        raise InputError(
            table_path,
            f"spot ids differ from {counts_file}: {n_only_counts} counts spot(s) missing here "
            f"(e.g. {_examples(ids[~in_table])}), {len(only_table)} spot(s) here without counts "
            f"(e.g. {_examples(only_table)}); use --on-mismatch intersect to continue",
        )
    if n_only_counts:
        if coords_from_table:
            log.warning(
                "%s: %d of %d counts spots have no row (so no coordinates) in the spot table "
                "and are dropped, e.g. %s",
                table_path,
                n_only_counts,
                len(ids),
                _examples(ids[~in_table]),
            )
            parts.subset(in_table)
            parts.n_dropped = n_only_counts
        else:
            log.warning(
                "%s: %d of %d counts spots are missing from the spot table and stay unlabelled, "
                "e.g. %s",
                table_path,
                n_only_counts,
                len(ids),
                _examples(ids[~in_table]),
            )
    if len(only_table):
        log.warning(
            "%s: %d spot(s) without counts are ignored, e.g. %s",
            table_path,
            len(only_table),
            _examples(only_table),
        )
        parts.n_ignored = len(only_table)
    return table.reindex(parts.obs.index)


def _categorical_labels(labels: pd.Series) -> pd.Categorical:
    if isinstance(labels.dtype, pd.CategoricalDtype):
        cat = pd.Categorical(
            labels.astype(object).mask(_is_missing_label(labels)),
            categories=[
                c for c in labels.cat.categories if str(c).strip().lower() not in _MISSING_LABELS
            ],
        )
        return cat.remove_unused_categories()
    text = labels.astype(object).where(~_is_missing_label(labels))
    return pd.Categorical(text.map(lambda v: v if pd.isna(v) else str(v).strip()))


def _uns_safe(obj: Any) -> Any:
    """Make a provenance block writable to ``.uns``: plain str / numbers / lists / dicts.

    ``torch.__version__`` is a ``str`` subclass h5py cannot write, and a ``/`` in a dict key would
    be split into HDF5 groups (the caller turns the ``inputs`` mapping into two lists).
    """
    if isinstance(obj, dict):
        return {str(k).replace("/", "|"): _uns_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_uns_safe(v) for v in obj]
    if isinstance(obj, str | PathLike):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _check_ingest_options(
    out: PathArg | None,
    counts: PathArg | None,
    spots: PathArg | None,
    h5ad: PathArg | None,
    visium: PathArg | None,
    orientation: str,
    on_mismatch: str,
) -> None:
    """Refuse contradictory or unknown options before anything is read."""
    sources = {"--counts": counts, "--h5ad": h5ad, "--visium": visium}
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        raise InputError(
            "/".join(sources), f"expected exactly one input source, got {given or 'none'}"
        )
    if orientation not in ORIENTATIONS:
        raise InputError("--orientation", f"expected one of {ORIENTATIONS}, got {orientation!r}")
    if on_mismatch not in MISMATCH_POLICIES:
        raise InputError(
            "--on-mismatch", f"expected one of {MISMATCH_POLICIES}, got {on_mismatch!r}"
        )
    if out is not None and not str(out).endswith(".h5ad"):
        raise InputError(out, "expected an output path ending in .h5ad")
    if counts is not None and spots is None:
        raise InputError(counts, "a counts table needs --spots (spot ids, coordinates, labels)")
    if orientation != "auto" and counts is None:
        log.warning("--orientation applies to counts tables only; ignored")


@dataclass
class _SpotTable:
    """The spot table, read and checked before the (slow) counts: labels, coordinates."""

    path: Path
    table: pd.DataFrame
    labels: pd.Series | None
    coords: pd.DataFrame | None


def _read_spot_inputs(
    spots: PathArg,
    spot_col: str | None,
    label_key: str | None,
    *,
    counts: PathArg | None,
    x_col: str,
    y_col: str,
) -> _SpotTable:
    """Read the spot table; its labels and (for a counts table) coordinates are checked now."""
    spots_path = _check_file(spots, "spot table")
    table = _read_spot_table(spots_path, spot_col)
    # checked before the (slow) counts read; coordinates are only required for counts tables
    labels = _labels_from_table(table, spots_path, label_key) if label_key else None
    if labels is not None:
        _check_label_case(labels, spots_path, label_key)
    coords_df = None
    if counts is not None:
        coords_df = _coords_from_table(table, spots_path, x_col, y_col)
    return _SpotTable(spots_path, table, labels, coords_df)


def _merge_spot_table(
    parts: _Parts,
    st: _SpotTable,
    *,
    label_key: str | None,
    x_col: str,
    y_col: str,
    on_mismatch: str,
) -> None:
    """Align the input's spots with the spot table; take its coordinates, labels, columns."""
    table, spots_path = st.table, st.path
    coords_df = st.coords
    coords_from_table = parts.coords is None
    if coords_from_table and coords_df is None:
        coords_df = _coords_from_table(table, spots_path, x_col, y_col)
    aligned = _align(
        parts, table, spots_path, coords_from_table=coords_from_table, on_mismatch=on_mismatch
    )
    if coords_df is not None and coords_from_table:
        parts.coords = coords_df.reindex(parts.obs.index).to_numpy()
    if st.labels is not None:
        parts.labels = st.labels.reindex(parts.obs.index)
    skip = {x_col, y_col} | ({label_key} if label_key else set())
    extra = _extra_columns(aligned, skip)
    for col in extra.columns:
        parts.obs[col] = extra[col]
    parts.inputs.append(spots_path)


def _read_inputs(
    counts: PathArg | None,
    spots: PathArg | None,
    h5ad: PathArg | None,
    visium: PathArg | None,
    *,
    orientation: str,
    label_key: str | None,
    x_col: str,
    y_col: str,
    spot_col: str | None,
    on_mismatch: str,
) -> _Parts:
    """Read the input source and the spot table into checked parts with coordinates."""
    st = None
    if spots is not None:
        st = _read_spot_inputs(spots, spot_col, label_key, counts=counts, x_col=x_col, y_col=y_col)
    if counts is not None:
        assert st is not None
        parts = _read_counts_table(counts, st.table.index, orientation)
    elif h5ad is not None:
        parts = _read_h5ad(h5ad, x_col, y_col)
    else:
        parts = _read_visium(visium)

    if st is not None:
        _merge_spot_table(
            parts, st, label_key=label_key, x_col=x_col, y_col=y_col, on_mismatch=on_mismatch
        )
    elif label_key:
        if parts.source == "h5ad":
            if label_key not in parts.obs:
                raise InputError(
                    h5ad,
                    f"label column {label_key!r} not in .obs (columns: {list(parts.obs.columns)}); "
                    "set --label-key, or --label-key '' for no labels",
                )
            parts.labels = parts.obs.pop(label_key)
            _check_label_case(parts.labels, h5ad, label_key)
        else:
            log.warning("%s: no spot table with labels given; every spot is unlabelled", visium)

    if parts.coords is None:
        where = h5ad if h5ad is not None else visium
        raise InputError(
            where,
            f"no coordinates: no .obsm['spatial'], no .obs columns {x_col!r} / {y_col!r}, "
            "and no spot table (--spots) with them",
        )
    nonfinite = ~np.isfinite(parts.coords).all(axis=1)
    if nonfinite.any():
        raise InputError(
            parts.inputs[0],
            f"missing or non-finite coordinates for {int(nonfinite.sum())} spot(s), first "
            f"{parts.obs.index[int(np.flatnonzero(nonfinite)[0])]!r}",
        )
    return parts


def _assemble(parts: _Parts, out_key: str | None) -> tuple[AnnData, dict[str, Any]]:
    """The standard AnnData of the parts and the summary of what it holds."""
    import anndata as ad

    obs = parts.obs
    obs.index = pd.Index(obs.index, dtype=object).rename(None)
    var = parts.var
    var.index = pd.Index(var.index, dtype=object).rename(None)
    if parts.labels is not None:
        assert out_key is not None
        obs[out_key] = _categorical_labels(parts.labels)
        labelled = obs[out_key].notna().to_numpy()
    else:
        labelled = np.zeros(obs.shape[0], dtype=bool)
    obs[LABELLED_KEY] = labelled

    X = parts.X
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers[COUNTS_LAYER] = X.copy()
    adata.obsm[SPATIAL_KEY] = np.ascontiguousarray(parts.coords, dtype=np.float64)
    adata.uns.update(parts.uns)

    if parts.labels is not None:
        counts_per = adata.obs[out_key].value_counts(sort=False)
        cats, ncat = [str(c) for c in counts_per.index], [int(n) for n in counts_per.to_numpy()]
    else:
        cats, ncat = [], []
    summary = {
        "source": parts.source,
        "orientation": parts.orientation or "",
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_labelled": int(labelled.sum()),
        "n_unlabelled": int((~labelled).sum()),
        "labels": cats,
        "label_counts": ncat,
        "total_counts": round(float(X.sum())),
        "n_spots_dropped": int(parts.n_dropped),
        "n_spot_rows_ignored": int(parts.n_ignored),
    }
    return adata, summary


def ingest_st(
    out: PathArg | None = None,
    counts: PathArg | None = None,
    spots: PathArg | None = None,
    h5ad: PathArg | None = None,
    visium: PathArg | None = None,
    orientation: str = "auto",
    label_key: str | None = DEFAULT_LABEL_KEY,
    x_col: str = "x",
    y_col: str = "y",
    *,
    spot_col: str | None = None,
    label_out_key: str | None = None,
    on_mismatch: str = "intersect",
) -> AnnData:
    """Read spatial transcriptomics data into the standard AnnData and write it to ``out``.

    Args:
        out: output ``.h5ad`` (written atomically); ``None`` only returns the AnnData.
        counts: counts table (CSV / TSV, gz ok), spots x genes or genes x spots; needs ``spots``.
        spots: spot table: spot id (first column or ``spot_col``), ``x_col``, ``y_col`` and
            ``label_key`` columns. Coordinates are read from it only where the main input has none.
        h5ad: an existing ``.h5ad`` instead of ``counts``.
        visium: a 10x Visium (Space Ranger) output folder instead of ``counts``.
        orientation: layout of ``counts``: ``"auto"``, ``"spots-by-genes"`` or
            ``"genes-by-spots"``.
        label_key: spot-table column (or ``.obs`` key of ``h5ad``) with the region / layer label;
            ``""`` / ``None`` for no labels.
        x_col: spot-table (or ``.obs``) column with x coordinates.
        y_col: spot-table (or ``.obs``) column with y coordinates.
        spot_col: spot-table column with the spot ids (default: the first column).
        label_out_key: ``.obs`` key the label is written to (default: ``label_key``).
        on_mismatch: ``"intersect"`` (warn, keep the common spots) or ``"error"`` when the spot
            ids of the counts and the spot table differ (no common id is always an error).

    Returns:
        AnnData of shape ``(n_spots, n_genes)`` with

        - ``.X``: raw counts, ``scipy.sparse.csr_matrix`` float32 (float64 if any count
          > 2**24); ``.layers["counts"]``: the same raw counts (a separate copy).
        - ``.obsm["spatial"]``: ``(n_spots, 2)`` float64 coordinates.
        - ``.obs[label_out_key]``: categorical label, NaN for unlabelled spots (absent when there
          are no labels); ``.obs["labelled"]``: bool. Other spot-table / input ``.obs`` columns
          are kept (numeric, else categorical).
        - ``.uns["neuroexplain_ingest"]``: ``{"params": provenance (package version, options,
          input paths + sha256), "summary": {"source", "orientation", "n_spots", "n_genes",
          "n_labelled", "n_unlabelled", "labels", "label_counts", "total_counts",
          "n_spots_dropped", "n_spot_rows_ignored"}, "label_key": key or ""}``.
        - ``.uns["spatial"]``: Visium images and scale factors (Visium / h5ad inputs that have it).

    Raises:
        InputError: naming the file and the problem, for any bad input (see the module docstring);
            nothing is written then.
    """
    from neuroexplain.provenance import provenance

    _check_ingest_options(out, counts, spots, h5ad, visium, orientation, on_mismatch)
    label_key = label_key or None
    out_key = label_out_key or label_key
    parts = _read_inputs(
        counts,
        spots,
        h5ad,
        visium,
        orientation=orientation,
        label_key=label_key,
        x_col=x_col,
        y_col=y_col,
        spot_col=spot_col,
        on_mismatch=on_mismatch,
    )
    adata, summary = _assemble(parts, out_key)
    params = {
        "counts": None if counts is None else str(counts),
        "spots": None if spots is None else str(spots),
        "h5ad": None if h5ad is None else str(h5ad),
        "visium": None if visium is None else str(visium),
        "orientation": orientation,
        "label_key": label_key or "",
        "label_out_key": out_key or "",
        "x_col": x_col,
        "y_col": y_col,
        "spot_col": spot_col or "",
        "on_mismatch": on_mismatch,
    }
    prov = provenance(params, inputs=parts.inputs, command="ingest-st")
    prov = _uns_safe(prov)
    adata.uns[INGEST_KEY] = {"params": prov, "summary": summary, "label_key": out_key or ""}

    if summary["n_labelled"]:
        log.info(
            "%d spots x %d genes; %d labelled (%s), %d unlabelled",
            adata.n_obs,
            adata.n_vars,
            summary["n_labelled"],
            ", ".join(
                f"{c} {n}" for c, n in zip(summary["labels"], summary["label_counts"], strict=True)
            ),
            summary["n_unlabelled"],
        )
    else:
        log.info("%d spots x %d genes; no labels", adata.n_obs, adata.n_vars)
    if out is not None:
        write_h5ad(adata, out)  # a full disk: one line, nothing left behind
        log.info("wrote %s", out)
    return adata
