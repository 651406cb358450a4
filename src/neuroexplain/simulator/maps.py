"""Simulator outputs: simulated images, displacement fields, Jacobian disease maps, region tables.

Sign convention (the same as the synthetic cohort's ground truth, :mod:`neuroexplain.synth`):
a **disease map** is ``log J`` with ``J`` the volume of tissue in the *diseased* image relative to
the *healthy* one, expressed on the diseased image's grid: ``log J > 0`` where disease expands
tissue (enlarged ventricles), ``< 0`` where it shrinks it (atrophy).

The maths. The simulator returns a displacement ``u`` (voxel units) and warps by pull-back
(MONAI ``Warp``): ``S(x) = I(phi(x))`` with ``phi(x) = x + u(x)``. The tissue shown at ``x`` in
``S`` comes from ``phi(x)`` in ``I``; a small volume ``dV`` around ``x`` in ``S`` holds the tissue
of ``det(D phi)(x) dV`` in ``I``. So, with ``J_u(x) = det(I + Du(x))``, **tissue in S relative to
I at x (on S's grid) is 1 / J_u(x)**, i.e. ``log`` expansion ``-log J_u(x)``.

* **inject** (``o = -1``; the input is healthy ``H = I``, the simulation diseased ``D = S``): the
  disease map on the diseased grid is ``m(x) = -log J_u(x)``. (This is exactly how the cohort's
  ground truth is defined: ``J_gt = 1 / det(I + Dw)`` for the pull-back ``w`` of its diseased
  image.)
* **remove** (``o = +1``; the input is diseased ``D = I``, the simulation healthy ``H = S``): the
  diseased image is the input, so the map belongs on the *input* grid. ``H = D o phi`` means
  ``D = H o phi^-1`` with ``phi^-1(y) = y + v(y)``, and the same rule with the pull-back ``v`` of
  ``D`` gives ``m(y) = -log J_v(y) = +log J_u(phi^-1(y))`` -- the expansion of the input relative
  to the simulated healthy image, at the input's own voxels. ``v`` is computed by the fixed point
  ``v = -u o (id + v)`` (:func:`invert_displacement`).

To first order (small ``u``) the remove map is ``+log J_u`` and the inject map ``-log J_u``; the
inversion only moves the map by the (sub-voxel to voxel) displacement, which matters for small
structures. Tests check both against analytic fields and against the volumes of warped masks.

For evaluation against the cohort's ground truth (diseased subjects, their own space), use the
**remove** direction on diseased subjects: the map is then on exactly the grid of the ground
truth. For a healthy subject the inject map shows where the classifier would see disease.

Reference: Liu, Adeli, Pohl, Zhao. Going Beyond Saliency Maps: Training Deep Models to Interpret
Deep Models. IPMI 2021 (the Jacobian determinant of the simulated deformation as the
explanation).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from neuroexplain.errors import InputError

if TYPE_CHECKING:
    from neuroexplain.io.atomic import WritePool

__all__ = [
    "DIRECTIONS",
    "ddf_to_world",
    "disease_jacobian",
    "disease_log_jacobian",
    "group_stats",
    "invert_displacement",
    "region_means",
    "run_simulate",
    "simulate",
    "warp_native",
]

logger = logging.getLogger(__name__)

#: direction name -> condition ``o``
DIRECTIONS = {"inject": -1.0, "remove": 1.0}
#: below this mean agreement (NCC of |disease map| with |classifier input gradient| in the
#: brain, model grid) ``simulate`` warns that the maps are not where the classifier looks.
#: Measured on the robustness cohorts' test subjects (benchmarks/results/
#: simulator_agreement.md): 0.41-0.48 where the maps matched the planted effect (NCC with the
#: truth 0.53-0.59), -0.13 to -0.08 where they did not (NCC with the truth -0.06 to -0.04
#: while the gradient map's was 0.45-0.50), so the line sits inside the gap.
AGREEMENT_MIN = 0.2
#: at most this many subjects (evenly spaced in the run's order) get the agreement check: its
#: input gradient costs about a fifth of a subject's simulation, and the verdict is a mean
AGREEMENT_SUBJECTS = 64


def _direction(direction: str | float) -> str:
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise ValueError(f"expected direction 'inject' or 'remove', got {direction!r}")
        return direction
    if float(direction) == -1.0:
        return "inject"
    if float(direction) == 1.0:
        return "remove"
    raise ValueError(f"expected a condition of -1 (inject) or +1 (remove), got {direction}")


def _warp_layer() -> Any:
    from monai.networks.blocks import Warp

    with warnings.catch_warnings():  # MONAI warns that it uses torch's grid_sample
        warnings.simplefilter("ignore")
        return Warp(mode="bilinear", padding_mode="border")


@torch.no_grad()
def invert_displacement(
    ddf: torch.Tensor, *, iterations: int = 50, tol: float = 1e-3
) -> tuple[torch.Tensor, float]:
    """Inverse of the transform ``x -> x + u(x)`` as a displacement ``v`` (``y -> y + v(y)``).

    Fixed-point iteration ``v <- -u(y + v(y))`` (converges when ``|Du| < 1``, i.e. for any
    smooth, non-folding field of moderate size), sampling ``u`` trilinearly with border padding.

    Args:
        ddf: ``u`` ``(B, 3, X, Y, Z)`` in voxel units.
        iterations: maximum number of iterations.
        tol: stop when the largest residual ``|v + u(y + v)|`` (voxels) is below this.

    Returns:
        ``(v, residual)``: ``(B, 3, X, Y, Z)`` and the final largest residual in voxels.

    Example:
        >>> u = torch.zeros(1, 3, 8, 8, 8)
        >>> v, res = invert_displacement(u)
        >>> float(v.abs().max()), res
        (0.0, 0.0)
    """
    warp = _warp_layer()
    u = ddf.float()
    v = -u
    res = float("inf")
    for _ in range(iterations):
        v_new = -warp(u, v)
        res = float((v_new - v).abs().max()) if v.numel() else 0.0
        v = v_new
        if res < tol:
            break
    resid = float((v + warp(u, v)).abs().max()) if v.numel() else 0.0
    return v, resid


def disease_log_jacobian(
    ddf: torch.Tensor, direction: str | float, *, eps: float = 1e-3, iterations: int = 50
) -> torch.Tensor:
    """Disease map ``log J`` (diseased relative to healthy, on the diseased image's grid).

    Args:
        ddf: the simulator's displacement ``u`` ``(B, 3, X, Y, Z)`` (voxels) for ``direction``.
        direction: ``"inject"`` / ``-1`` (map on the simulated image's grid: ``-log J_u``) or
            ``"remove"`` / ``+1`` (map on the input's grid: ``-log J_v`` with ``v`` the inverse
            displacement, ``= +log J_u`` at the corresponding point). See the module docstring.
        eps: determinants are clipped at ``eps`` before the log (folding voxels).
        iterations: fixed-point iterations of the inversion (remove only).

    Returns:
        ``(B, 1, X, Y, Z)`` float32 map: ``> 0`` tissue expanded by the disease, ``< 0`` shrunk.

    Example:
        >>> u = torch.zeros(1, 3, 8, 8, 8)
        >>> float(disease_log_jacobian(u, "remove").abs().max())
        0.0
    """
    from neuroexplain.jacobian import log_jacobian

    name = _direction(direction)
    field = ddf.detach().float()
    if name == "remove":
        field, resid = invert_displacement(field, iterations=iterations)
        if resid > 0.05:
            logger.warning("field inversion residual %.3g voxels (large or folding field)", resid)
    return -log_jacobian(field, eps=eps)


def disease_jacobian(
    ddf: torch.Tensor, direction: str | float, *, eps: float = 1e-3, iterations: int = 50
) -> torch.Tensor:
    """``exp`` of :func:`disease_log_jacobian`: volume ratio diseased / healthy ``(B, 1, ...)``."""
    return torch.exp(disease_log_jacobian(ddf, direction, eps=eps, iterations=iterations))


@torch.no_grad()
def simulate(
    model: torch.nn.Module,
    images: torch.Tensor,
    condition: str | float | torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    progress: bool | None = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the simulator over images in batches (no gradients).

    Args:
        model: a :class:`~neuroexplain.simulator.network.SimulatorNet`.
        images: ``(N, C, X, Y, Z)``.
        condition: ``"inject"``, ``"remove"``, ``-1``, ``+1`` or a ``(N,)`` tensor of them.
        batch_size: images per forward pass.
        device: where to run.
        progress: progress bar.

    Returns:
        ``(simulated (N, C, X, Y, Z), ddf (N, 3, X, Y, Z))`` float32 on CPU.
    """
    from tqdm.auto import tqdm

    from neuroexplain.utils import amp_enabled

    dev = torch.device(device)
    n = images.shape[0]
    if isinstance(condition, str):
        condition = DIRECTIONS[_direction(condition)]
    cond = torch.as_tensor(condition, dtype=torch.float32).reshape(-1)
    cond = cond.expand(n) if cond.numel() == 1 else cond
    model = model.to(dev).eval()
    sims, ddfs = [], []
    disable = None if progress is None else not progress
    for i in tqdm(range(0, n, batch_size), desc="simulate", unit="batch", disable=disable):
        x = images[i : i + batch_size].to(dev, torch.float32)
        with torch.autocast(dev.type, enabled=amp_enabled(dev)):
            s, u = model(x, cond[i : i + batch_size].to(dev))
        sims.append(s.float().cpu())
        ddfs.append(u.float().cpu())
    return torch.cat(sims), torch.cat(ddfs)


# ----------------------------------------------------------------------------- native space


def ddf_to_world(ddf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel-unit displacement ``(3, X, Y, Z)`` on a grid -> millimetres along world axes.

    A displacement of ``u`` voxels moves a point by ``A[:3, :3] @ u`` mm in world (RAS+)
    coordinates, for the grid's voxel-to-world affine ``A``.
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.einsum("ij,j...->i...", a, np.asarray(ddf, dtype=np.float64)).astype(np.float32)


def warp_native(
    data: np.ndarray, affine: np.ndarray, disp_world: np.ndarray, *, order: int = 1
) -> np.ndarray:
    """Pull-back warp of a native image by a world-mm displacement sampled on its grid.

    ``out(p) = data(A^-1 (A p + d(p)))`` for every native voxel ``p`` (``A`` = native affine),
    trilinear (``order=1``) with edge values outside the image.

    Args:
        data: ``(X, Y, Z)`` native image.
        affine: its ``(4, 4)`` voxel-to-world affine.
        disp_world: ``(3, X, Y, Z)`` displacement in mm along world axes (0 = identity).
        order: spline order of :func:`scipy.ndimage.map_coordinates`.

    Returns:
        ``(X, Y, Z)`` float32 warped image.
    """
    from scipy import ndimage as ndi

    a = np.asarray(affine, dtype=np.float64)
    inv = np.linalg.inv(a)[:3, :3]
    # voxel offsets = A^-1 (linear part) applied to the world displacement
    dvox = np.einsum("ij,j...->i...", inv, np.asarray(disp_world, dtype=np.float64))
    grid = np.indices(data.shape, dtype=np.float64)
    return ndi.map_coordinates(
        np.asarray(data, dtype=np.float32), grid + dvox, order=order, mode="nearest"
    ).astype(np.float32)


# ------------------------------------------------------------------------------ region tables


def region_means(
    values: np.ndarray, labels: np.ndarray, regions: Mapping[str, Sequence[int]]
) -> dict[str, tuple[float, int]]:
    """Mean of ``values`` over each region (union of its labels).

    Args:
        values: ``(X, Y, Z)`` map.
        labels: ``(X, Y, Z)`` integer label map on the same grid.
        regions: ``{name: [label, ...]}``.

    Returns:
        ``{name: (mean, n_voxels)}`` (mean NaN for an empty region).
    """
    v = np.asarray(values, dtype=np.float64)
    lab = np.asarray(labels)
    if v.shape != lab.shape:
        raise ValueError(f"map shape {v.shape} differs from label shape {lab.shape}")
    out = {}
    for name, ids in regions.items():
        m = np.isin(lab, np.asarray(list(ids)))
        n = int(m.sum())
        out[name] = (float(v[m].mean()) if n else float("nan"), n)
    return out


def group_stats(
    table: Any, *, value: str = "mean_logjacobian", by: Sequence[str] = ("group", "region")
) -> Any:
    """Across-subject statistics per group and region: mean, sd, one-sample t-test against 0.

    Args:
        table: long DataFrame with one row per subject and region (columns ``by`` + ``value``).
        value: the column tested.
        by: grouping columns.

    Returns:
        DataFrame with ``by`` + ``n, mean, sd, t, p`` (``scipy.stats.ttest_1samp``, two-sided;
        NaN with fewer than 2 subjects).
    """
    import pandas as pd
    from scipy import stats

    rows = []
    for keys, g in table.groupby(list(by), sort=False):
        vals = g[value].to_numpy(dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        n = int(vals.size)
        if n >= 2 and np.ptp(vals) > 0:
            t, p = stats.ttest_1samp(vals, 0.0)
            t, p = float(t), float(p)
        else:
            t = p = float("nan")
        rows.append(
            {
                **dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True)),
                "n": n,
                "mean": float(vals.mean()) if n else float("nan"),
                "sd": float(vals.std(ddof=1)) if n >= 2 else float("nan"),
                "t": t,
                "p": p,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- the run

CONVENTION = (
    "log-Jacobian disease map: volume of tissue in the diseased image relative to the healthy "
    "one, on the diseased image's grid (> 0 expanded, < 0 shrunk). remove: the input is the "
    "diseased image (map on its grid); inject: the simulated image is (map on the input grid, "
    "which the simulated image shares)."
)
MAP_DIRECTIONS = ("auto", "label", "prediction", "inject", "remove")


def _choose_direction(mode: str, y: float, logit: float) -> str:
    """Which simulation gives a subject's disease map: remove for diseased, inject for healthy."""
    if mode in ("inject", "remove"):
        return mode
    if mode == "label" or (mode == "auto" and np.isfinite(y)):
        if not np.isfinite(y):
            raise InputError("--map-direction", "label chosen but the subject has no label")
        return "remove" if y == 1 else "inject"
    return "remove" if logit > 0 else "inject"


def _region_set(
    data: Mapping[str, Any],
    regions: Mapping[str, Sequence[int]],
    all_labels: bool,
    labels: np.ndarray | None,
) -> dict[str, list[int]]:
    out = {k: list(v) for k, v in regions.items()}
    if all_labels and labels is not None:
        names = {int(k): str(v) for k, v in (data.get("dseg_names") or {}).items()}
        for lab in sorted(int(v) for v in np.unique(labels) if v > 0):
            name = f"label{lab:03d}_{names[lab]}" if lab in names else f"label{lab:03d}"
            out.setdefault(name.replace(" ", "_"), [lab])
    return out


@dataclass
class _SimInputs:
    """What :func:`run_simulate` loads: the data, both networks and the chosen subjects."""

    data: dict[str, Any]
    images: torch.Tensor
    dev: torch.device
    model: torch.nn.Module
    sckpt: dict[str, Any]
    clf: torch.nn.Module
    idx: list[int]
    y_all: np.ndarray
    region_notes: list[str]


@dataclass
class _SimContext:
    """The run's settings and the blocks every output carries (provenance, sidecar fields)."""

    out: Path
    regions: dict[str, Sequence[int]]
    all_labels: bool
    map_direction: str
    write_images: bool
    sim_sha: str
    clf_sha: str
    prov: dict[str, Any]
    common: dict[str, Any]


def _load_simulate_inputs(
    preproc: str | os.PathLike[str],
    simulator: str | os.PathLike[str],
    classifier: str | os.PathLike[str],
    *,
    subjects: str | Sequence[str],
    split: str | os.PathLike[str] | None,
    regions: Mapping[str, Sequence[int]],
    device: str,
) -> _SimInputs:
    """Load ``preproc.pt``, the simulator and the classifier; choose the subjects; check regions."""
    from neuroexplain.simulator.train import freeze, load_simulator
    from neuroexplain.stage import load_mri_context
    from neuroexplain.utils import check_region_labels

    ctx = load_mri_context(preproc, classifier, split=split, device=device)
    data, dev, clf = ctx.preproc, ctx.device, ctx.model
    images = data["images"].float()
    shape = list(images.shape[1:])
    model, sckpt = load_simulator(simulator, map_location=dev)
    if sckpt.get("input_shape") and list(sckpt["input_shape"]) != shape:
        raise InputError(
            simulator, f"simulator trained on inputs {sckpt['input_shape']}, got data {shape}"
        )
    freeze(clf)
    idx = ctx.select(subjects)
    n_all = images.shape[0]
    y_all = data["y"].double().numpy() if data["y"] is not None else np.full(n_all, np.nan)
    region_notes: list[str] = []
    if regions:  # a label no subject has would only give empty rows: refuse it before the work
        if data.get("dseg") is None:
            raise InputError(
                preproc, "has no label maps (dseg) for the --regions tables: ingest with dseg"
            )
        region_notes = check_region_labels(
            regions,
            [np.unique(data["dseg"][i, 0].numpy()) for i in idx],
            where=f"{Path(preproc).name}, model grid",
            subjects=[str(data["subjects"][i]) for i in idx],
        )
    return _SimInputs(data, images, dev, model, sckpt, clf, idx, y_all, region_notes)


def _simulate_context(
    preproc: str | os.PathLike[str],
    simulator: str | os.PathLike[str],
    classifier: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    subjects: str | Sequence[str],
    regions: dict[str, Sequence[int]],
    all_labels: bool,
    map_direction: str,
    write_images: bool,
    seed: int | None,
) -> _SimContext:
    """Checksums, provenance and the sidecar fields shared by every output of the run."""
    from neuroexplain.provenance import provenance, sha256_file

    sim_sha, clf_sha = sha256_file(simulator), sha256_file(classifier)
    params = {
        "preproc": str(preproc),
        "simulator": str(simulator),
        "classifier": str(classifier),
        "subjects": subjects if isinstance(subjects, str) else list(subjects),
        "regions": regions,
        "all_labels": bool(all_labels),
        "map_direction": map_direction,
        "write_images": bool(write_images),
    }
    prov = provenance(
        params, seed=seed, inputs=[preproc, simulator, classifier], command="simulate"
    )
    common = {
        "Convention": CONVENTION,
        "Simulator": str(simulator),
        "SimulatorSHA256": sim_sha,
        "Classifier": str(classifier),
        "ClassifierSHA256": clf_sha,
        "Reference": "Liu, Adeli, Pohl, Zhao. Going Beyond Saliency Maps: Training Deep Models "
        "to Interpret Deep Models. IPMI 2021.",
        "provenance": prov,
    }
    return _SimContext(
        Path(out), regions, all_labels, map_direction, write_images, sim_sha, clf_sha, prov, common
    )


def input_gradient(clf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gradient of the classifier's logit with respect to its input, ``(B, 1, X, Y, Z)`` (CPU);
    the weights get no gradient."""
    from neuroexplain.simulator.train import logit_of

    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(logit_of(clf(xg)).float().sum(), xg)
    return grad.detach().float().cpu()


def gradient_agreement(disease_map: np.ndarray, gradient: np.ndarray, brain: np.ndarray) -> float:
    """NCC of ``|disease_map|`` and ``|gradient|`` inside ``brain`` (NaN if either is constant).

    A check without ground truth: a simulator that flips the classifier by changing what the
    classifier looks at makes a map that overlaps its input gradient; one that found a way
    around it (a warp where the classifier is not looking, e.g. through a voxel-wise linear
    term) does not.
    """
    from neuroexplain.evaluate.harness import ncc

    return ncc(np.abs(disease_map), np.abs(gradient), brain)


@torch.no_grad()
def _simulate_batch(
    inp: _SimInputs, x: torch.Tensor, *, gradient: bool = True
) -> tuple[torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """Input logits and, per direction, simulation, field, cycle image, logit and disease map
    (and, with ``gradient``, the classifier's input gradient under ``res["gradient"]["map"]``)."""
    from neuroexplain.simulator.train import logit_of

    b = x.shape[0]
    res: dict[str, dict[str, torch.Tensor]] = {}
    if gradient:
        res["gradient"] = {"map": input_gradient(inp.clf, x)}
    l_in = logit_of(inp.clf(x)).float().cpu()
    for name, o in DIRECTIONS.items():
        cond = torch.full((b,), o, device=inp.dev)
        sim, ddf = inp.model(x, cond)
        back, _ = inp.model(sim, -cond)
        res[name] = {
            "sim": sim.float().cpu(),
            "ddf": ddf.float().cpu(),
            "back": back.float().cpu(),
            "logit": logit_of(inp.clf(sim)).float().cpu(),
            "map": disease_log_jacobian(ddf.cpu(), name).cpu(),
        }
    return l_in, res


def _subject_row(
    inp: _SimInputs,
    i: int,
    j: int,
    head: dict[str, Any],
    res: dict[str, dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """The ``subjects.tsv`` row of subject ``i`` (``j`` in its batch): flips, cycle, field size."""
    lg = head["logit"]
    if inp.data["dseg"] is not None:
        brain = inp.data["dseg"][i, 0].numpy() > 0
    else:
        brain = inp.images[i, 0].numpy() > 0
    x0 = inp.images[i, 0].numpy()
    denom = float(np.abs(x0[brain]).mean()) if brain.any() else float("nan")
    row: dict[str, Any] = dict(head)
    row["gradient_agreement"] = (
        gradient_agreement(
            res[head["map_direction"]]["map"][j, 0].numpy(),
            res["gradient"]["map"][j, 0].numpy(),
            brain,
        )
        if "gradient" in res
        else float("nan")
    )
    for name in DIRECTIONS:
        r = res[name]
        back = r["back"][j, 0].numpy()
        other = "remove" if name == "inject" else "inject"
        cyc = float(np.abs(back - x0)[brain].mean()) if brain.any() else float("nan")
        mag = r["ddf"][j].norm(dim=0)
        row.update(
            {
                f"logit_{name}": float(r["logit"][j]),
                f"flipped_{name}": bool(
                    (r["logit"][j] > 0) != (lg > 0)
                    and ((name == "inject") == (float(r["logit"][j]) > 0))
                ),
                f"target_{name}": bool((float(r["logit"][j]) > 0) == (name == "inject")),
                f"cycle_{name}_{other}": cyc,
                f"cycle_{name}_{other}_rel": cyc / denom if denom else float("nan"),
                f"max_disp_{name}_vox": float(mag.max()),
                f"mean_disp_{name}_vox": float(mag[torch.from_numpy(brain)].mean())
                if brain.any()
                else float("nan"),
            }
        )
    return row


def _write_subject_maps(
    ctx: _SimContext,
    pool: WritePool,
    sub: str,
    chosen: str,
    img: Any,
    maps_native: dict[str, np.ndarray],
    jac: np.ndarray,
    side: dict[str, Any],
) -> dict[str, Path]:
    """Queue the subject's native disease maps on ``pool``: logJ of the chosen and of each
    direction, J.

    Returns:
        ``{method: path}`` of the log-Jacobian maps (the ones the maps manifest lists).
    """
    from neuroexplain.attribution.export import map_path
    from neuroexplain.io.nifti import save_map

    written: dict[str, Path] = {}
    for key, arr in maps_native.items():
        direction = chosen if key == "simulator" else key.removeprefix("simulator")
        written[key] = map_path(ctx.out, sub, key, "logjacobian")
        pool.submit(
            save_map,
            arr,
            img,
            written[key],
            description=f"neuroexplain simulator: disease logJ ({direction})",
            intent_name="logjacobian",
            sidecar={**side, "Method": key, "Direction": direction, "Space": "native T1w"},
        )
    pool.submit(
        save_map,
        jac,
        img,
        map_path(ctx.out, sub, "simulator", "jacobian"),
        description=f"neuroexplain simulator: disease J ({chosen})",
        intent_name="jacobian",
        sidecar={**side, "Method": "simulator", "Direction": chosen, "Space": "native T1w"},
    )
    return written


def _write_subject_images(
    ctx: _SimContext,
    pool: WritePool,
    sub: str,
    img: Any,
    model_affine: np.ndarray,
    ddfs: dict[str, np.ndarray],
    side: dict[str, Any],
) -> None:
    """Queue the subject's native displacement fields (mm, RAS+) and warped T1w per direction
    on ``pool`` (resampled and warped there too: they feed no table)."""
    t1 = np.asarray(img.get_fdata(dtype=np.float32))
    for name in DIRECTIONS:
        pool.submit(
            _write_direction_images, ctx.out, sub, name, img, t1, model_affine, ddfs[name], side
        )


def _write_direction_images(
    out: Path,
    sub: str,
    name: str,
    img: Any,
    t1: np.ndarray,
    model_affine: np.ndarray,
    ddf: np.ndarray,
    side: dict[str, Any],
) -> None:
    """Write the native displacement field (mm, RAS+) and warped T1w of one direction."""
    from neuroexplain.attribution.export import subject_label
    from neuroexplain.io.nifti import save_displacement, save_map
    from neuroexplain.mri.preprocess import to_native

    disp = to_native(ddf_to_world(ddf, model_affine), model_affine, img)  # (3, X, Y, Z) mm
    label = subject_label(sub)
    folder = out / f"sub-{label}"
    save_displacement(
        np.moveaxis(disp, 0, -1),
        img,
        folder / f"sub-{label}_desc-{name}_displacement.nii.gz",
        description=f"neuroexplain simulator: {name} displacement (mm, RAS)",
        sidecar={
            **side,
            "Direction": name,
            "Units": "mm",
            "Axes": "world RAS+ (nibabel convention)",
            "Convention": "pull-back: simulated(p) = input(p + d(p))",
        },
    )
    save_map(
        warp_native(t1, img.affine, disp),
        img,
        folder / f"sub-{label}_desc-{name}_T1w.nii.gz",
        description=f"neuroexplain simulator: T1w with disease {name}d",
        intent="none",
        sidecar={**side, "Direction": name, "Interpolation": "trilinear"},
    )


def _subject_region_rows(
    ctx: _SimContext,
    data: Mapping[str, Any],
    i: int,
    head: dict[str, Any],
    img: Any,
    maps_model: dict[str, np.ndarray],
    maps_native: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """``regions.tsv`` rows of a subject, on the native dseg (model grid when there is none)."""
    from neuroexplain.io.nifti import load_labels

    dseg_path = (data.get("dseg_paths") or [""] * (i + 1))[i]
    if dseg_path and Path(dseg_path).is_file():
        _, labels = load_labels(dseg_path, img, like_path=data["t1_paths"][i])
        vals = maps_native
    elif data["dseg"] is not None:
        labels, vals = data["dseg"][i, 0].numpy(), maps_model
    else:
        labels, vals = None, {}
    reg = _region_set(data, ctx.regions, ctx.all_labels, labels)
    rows: list[dict[str, Any]] = []
    if labels is not None and reg:
        chosen = head["map_direction"]
        for key, arr in vals.items():
            for name, (mean, n) in region_means(arr, labels, reg).items():
                rows.append(
                    {
                        "subject": head["subject"],
                        "y": head["y"],
                        "map": key,
                        "direction": chosen if key == "simulator" else key[9:],
                        "region": name,
                        "labels": ",".join(str(v) for v in reg[name]),
                        "n_voxels": n,
                        "mean_logjacobian": mean,
                    }
                )
    return rows


def _simulate_subject(
    ctx: _SimContext,
    pool: WritePool,
    inp: _SimInputs,
    i: int,
    j: int,
    l_in: torch.Tensor,
    res: dict[str, dict[str, torch.Tensor]],
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Path]]:
    """Table rows of subject ``i`` (``j`` in its batch) and its log-Jacobian maps; queues its
    native-space outputs on ``pool``."""
    from neuroexplain.attribution.export import native_reference, subject_label
    from neuroexplain.mri.preprocess import to_native

    data = inp.data
    sub = str(data["subjects"][i])
    y = float(inp.y_all[i])
    lg = float(l_in[j])
    chosen = _choose_direction(ctx.map_direction, y, lg)
    head = {"subject": sub, "y": y, "logit": lg, "map_direction": chosen}
    row = _subject_row(inp, i, j, head, res)

    img = native_reference(data, i)
    model_affine = np.asarray(data["model_affines"][i], dtype=np.float64)
    maps_model = {
        "simulator": res[chosen]["map"][j, 0].numpy(),
        "simulatorinject": res["inject"]["map"][j, 0].numpy(),
        "simulatorremove": res["remove"]["map"][j, 0].numpy(),
    }
    maps_native = {k: to_native(v, model_affine, img) for k, v in maps_model.items()}
    side = {**ctx.common, "Subject": f"sub-{subject_label(sub)}"}
    jac = 1.0 + to_native(np.exp(maps_model["simulator"]) - 1.0, model_affine, img)
    written = _write_subject_maps(ctx, pool, sub, chosen, img, maps_native, jac, side)
    if ctx.write_images:
        ddfs = {name: res[name]["ddf"][j].numpy() for name in DIRECTIONS}
        _write_subject_images(ctx, pool, sub, img, model_affine, ddfs, side)
    regions = _subject_region_rows(ctx, data, i, head, img, maps_model, maps_native)
    return row, regions, written


def _write_simulate_tables(
    out: Path, subj_rows: list[dict[str, Any]], region_rows: list[dict[str, Any]]
) -> tuple[Any, Any]:
    """Write ``subjects.tsv``, ``regions.tsv`` and ``group.tsv``; return subjects and groups."""
    import pandas as pd

    from neuroexplain.io.atomic import write_table

    subj_df = pd.DataFrame(subj_rows)
    write_table(subj_df, out / "subjects.tsv")
    group_df = pd.DataFrame()
    if region_rows:
        reg_df = pd.DataFrame(region_rows)
        write_table(reg_df, out / "regions.tsv")
        parts = [reg_df.assign(group="all")]
        if reg_df["y"].notna().any():
            parts.append(reg_df[reg_df["y"] == 1].assign(group="diseased"))
            parts.append(reg_df[reg_df["y"] == 0].assign(group="healthy"))
        group_df = group_stats(pd.concat(parts, ignore_index=True), by=("map", "group", "region"))
        write_table(group_df, out / "group.tsv")
    return subj_df, group_df


def _simulate_summary(
    ctx: _SimContext, subj_df: Any, group_df: Any, region_notes: list[str]
) -> dict[str, Any]:
    """The ``simulate.json`` content: flip, target and cycle rates, group table, provenance."""

    def frac(col: str, mask: Any) -> float | None:
        sel = subj_df.loc[mask, col]
        return float(sel.mean()) if len(sel) else None

    pred_pos = subj_df["logit"] > 0
    agree = subj_df["gradient_agreement"].dropna()
    agreement_mean = float(agree.mean()) if len(agree) else None
    notes = list(region_notes)
    ok = None if agreement_mean is None else agreement_mean >= AGREEMENT_MIN
    if ok is False:
        notes.append(
            f"the disease maps do not overlap where the classifier looks: mean NCC of |map| "
            f"with |classifier input gradient| {agreement_mean:.2f} < {AGREEMENT_MIN}; the "
            "simulator flips the classifier some other way (e.g. through a voxel-wise linear "
            "term), so read the baseline saliency maps instead"
        )
    return {
        "n_subjects": len(subj_df),
        "gradient_agreement": {
            "mean": agreement_mean,
            "min_expected": AGREEMENT_MIN,
            "ok": ok,
            "n_subjects": len(agree),
            "definition": "per subject, NCC of |disease map| (the map_direction's log-Jacobian) "
            "with |d logit / d input| of the explained classifier in the brain, model grid; "
            f"mean over the subjects (all, or {AGREEMENT_SUBJECTS} evenly spaced ones and those "
            "sharing their batch); a check without ground truth",
        },
        "flip_rate": {
            "inject": frac("flipped_inject", ~pred_pos),
            "remove": frac("flipped_remove", pred_pos),
            "both": float(
                np.mean(
                    list(subj_df.loc[~pred_pos, "flipped_inject"])
                    + list(subj_df.loc[pred_pos, "flipped_remove"])
                )
            )
            if len(subj_df)
            else None,
        },
        "flip_rate_definition": "inject: fraction of subjects predicted healthy whose simulated "
        "image is predicted diseased; remove: the reverse; both: over all those simulations",
        "target_rate": {
            "inject": frac("target_inject", slice(None)),
            "remove": frac("target_remove", slice(None)),
        },
        "cycle_error": {
            "inject_remove": float(subj_df["cycle_inject_remove"].mean()),
            "remove_inject": float(subj_df["cycle_remove_inject"].mean()),
            "inject_remove_relative": float(subj_df["cycle_inject_remove_rel"].mean()),
            "remove_inject_relative": float(subj_df["cycle_remove_inject_rel"].mean()),
        },
        "cycle_error_definition": "mean |G(G(x, o), -o) - x| in the brain (model grid, "
        "normalised intensities); relative: divided by the mean brain intensity",
        "group": group_df.to_dict(orient="records"),
        "convention": CONVENTION,
        "simulator_sha256": ctx.sim_sha,
        "classifier_sha256": ctx.clf_sha,
        "provenance": ctx.prov,
        "warnings": notes,
    }


def run_simulate(
    preproc: str | os.PathLike[str],
    simulator: str | os.PathLike[str],
    classifier: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    subjects: str | Sequence[str] = "test",
    split: str | os.PathLike[str] | None = None,
    regions: Mapping[str, Sequence[int]] | None = None,
    all_labels: bool = False,
    map_direction: str = "auto",
    write_images: bool = True,
    batch_size: int = 4,
    device: str = "auto",
    writers: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Simulate both directions for chosen subjects and write every output in native space.

    Per subject ``X`` in ``out/sub-X/`` (native T1w grid and affine, JSON sidecars):

    * ``sub-X_desc-inject_T1w.nii.gz``, ``sub-X_desc-remove_T1w.nii.gz``: the native T1w
      warped by each simulated deformation (trilinear);
    * ``sub-X_desc-inject_displacement.nii.gz``, ``..._desc-remove_...``: 5D displacement
      fields (``(X, Y, Z, 1, 3)``, "displacement vector" intent) in mm along world RAS+ axes,
      pull-back: ``simulated(p) = input(p + d(p))``;
    * ``sub-X_desc-simulator_jacobian.nii.gz`` and ``sub-X_desc-simulator_logjacobian.nii.gz``:
      the disease map of the subject (direction chosen by ``map_direction``; see the module
      docstring for the maths and sign);
    * ``sub-X_desc-simulatorinject_logjacobian.nii.gz``, ``..._desc-simulatorremove_...``: the
      disease map of each direction.

    In ``out/``: ``subjects.tsv`` (logits before / after, flips, cycle errors, direction,
    displacement sizes), ``regions.tsv`` (mean log-Jacobian per subject, map and region, on the
    native dseg), ``group.tsv`` (per map, group and region: n, mean, sd, one-sample t and p),
    ``simulate.json`` (summary and provenance) and ``maps.json``, the maps manifest
    (:func:`neuroexplain.stage.write_maps_manifest`) of the three log-Jacobian maps, kind
    ``log-jacobian``, ``simulator`` the primary one.

    Args:
        preproc: ``preproc.pt`` of ``neuroexplain ingest-mri``.
        simulator: ``model.pt`` of ``neuroexplain train-simulator``.
        classifier: ``model.pt`` of ``neuroexplain train-classifier``.
        out: output folder (``results/simulator``).
        subjects: ``"test"`` / ``"val"`` / ``"train"`` (rows of ``split``), ``"all"`` or ids.
        split: ``split.tsv`` (default: next to the classifier checkpoint).
        regions: ``{name: [dseg labels]}`` for the region tables.
        all_labels: also tabulate every dseg label separately.
        map_direction: ``"auto"`` (remove for subjects labelled diseased, inject for healthy;
            the classifier's decision when unlabelled), ``"label"``, ``"prediction"``,
            ``"inject"`` or ``"remove"``.
        write_images: write the simulated T1w images and displacement fields (the maps and
            tables are always written).
        batch_size: subjects per forward pass.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        writers: threads that compress and write the NIfTI files while the next subjects are
            simulated (default: torch's thread count, i.e. ``--threads``); the files do not
            depend on it.
        progress: progress bar (``None``: only on a terminal).

    Returns:
        The ``simulate.json`` content.
    """
    from tqdm.auto import tqdm

    from neuroexplain.io.atomic import WritePool, write_json
    from neuroexplain.stage import write_maps_manifest

    if map_direction not in MAP_DIRECTIONS:
        raise InputError(
            "--map-direction", f"expected one of {MAP_DIRECTIONS}, got {map_direction!r}"
        )
    regions = dict(regions or {})
    inp = _load_simulate_inputs(
        preproc,
        simulator,
        classifier,
        subjects=subjects,
        split=split,
        regions=regions,
        device=device,
    )
    ctx = _simulate_context(
        preproc,
        simulator,
        classifier,
        out,
        subjects=subjects,
        regions=regions,
        all_labels=all_labels,
        map_direction=map_direction,
        write_images=write_images,
        seed=inp.sckpt.get("train_config", {}).get("seed"),
    )
    subj_rows: list[dict[str, Any]] = []
    region_rows: list[dict[str, Any]] = []
    written: dict[str, dict[str, Path]] = {}
    idx = inp.idx
    # the subjects of the agreement check: all, or an evenly spaced sample of a large run
    checked = set(idx[:: -(-len(idx) // AGREEMENT_SUBJECTS)]) if idx else set()
    disable = None if progress is None else not progress
    bar = tqdm(total=len(idx), desc="simulate", unit="subject", disable=disable)
    # the NIfTI files are compressed and written on writer threads while the next subjects are
    # simulated; rows and manifest entries are collected here, in subject order
    with WritePool(max(1, writers or torch.get_num_threads())) as pool:
        for start in range(0, len(idx), batch_size):
            bidx = idx[start : start + batch_size]
            l_in, res = _simulate_batch(
                inp, inp.images[bidx].to(inp.dev), gradient=not checked.isdisjoint(bidx)
            )
            for j, i in enumerate(bidx):
                row, rows, maps = _simulate_subject(ctx, pool, inp, i, j, l_in, res)
                written[row["subject"]] = maps
                subj_rows.append(row)
                region_rows.extend(rows)
                bar.update(1)
    bar.close()

    subj_df, group_df = _write_simulate_tables(ctx.out, subj_rows, region_rows)
    summary = _simulate_summary(ctx, subj_df, group_df, inp.region_notes)
    if summary["gradient_agreement"]["ok"] is False:
        logger.warning("%s: %s", ctx.out / "simulate.json", summary["warnings"][-1])
    write_json(summary, ctx.out / "simulate.json")
    write_maps_manifest(
        ctx.out,
        "simulate",
        written,
        dict.fromkeys(("simulator", "simulatorinject", "simulatorremove"), "log-jacobian"),
        provenance=ctx.prov,
        primary=["simulator"],
    )
    logger.info(
        "simulated %d subjects: flip rate inject %s, remove %s -> %s",
        len(subj_df),
        summary["flip_rate"]["inject"],
        summary["flip_rate"]["remove"],
        ctx.out,
    )
    return summary
