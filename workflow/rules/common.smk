# Helpers shared by all stages (config validation, dataset resolution, result paths, named
# input / params functions, the registry of final targets). Keep rules out of this file.

import functools
import os
import shlex
import shutil
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as exc:
    # one line naming the config file(s), the key and the problem (not the schema dump)
    cause = exc.__context__  # the jsonschema ValidationError
    if not hasattr(cause, "absolute_path"):
        raise
    where = ", ".join(str(f) for f in workflow.configfiles) or "--config"
    key = ".".join(str(k) for k in cause.absolute_path) or "(top level)"
    raise WorkflowError(f"invalid config ({where}): {key}: {cause.message}") from None


##### final targets #####

# Each stage's .smk appends its final outputs here, under its `activate` switch.
ALL_TARGETS = []


def all_input(wildcards):
    """Input of the `all` target: every file registered by an active stage."""
    return ALL_TARGETS


##### result paths (use these in later stages instead of repeating the strings) #####

COHORT_DIR = "results/cohort"
MRI_INGEST = {
    "preproc": "results/ingest/mri/preproc.pt",
    "subjects": "results/ingest/mri/subjects.tsv",
    "meta": "results/ingest/mri/ingest.json",
}
ST_H5AD = f"results/ingest/st/{config['st']['name']}.h5ad"
CLASSIFIER = {
    "model": "results/classifier/model.pt",
    "metrics": "results/classifier/metrics.json",
    "logits": "results/classifier/logits.tsv",
    "split": "results/classifier/split.tsv",
    "quality": "results/classifier/quality.json",
    "quality_table": "results/classifier/quality.html",
}
RELIANCE = {
    "table": "results/classifier/reliance.tsv",
    "summary": "results/classifier/reliance_summary.tsv",
    "json": "results/classifier/reliance.json",
}
SALIENCY_DIR = "results/saliency"
SALIENCY_MANIFEST = "results/saliency/maps.json"
EVALUATION = {
    "json": "results/evaluation/maps.json",
    "md": "results/evaluation/maps.md",
    "subjects": "results/evaluation/maps_subjects.tsv",
}
SIMULATOR = {
    "model": "results/simulator_model/model.pt",
    "train_log": "results/simulator_model/train_log.tsv",
    "train_summary": "results/simulator_model/train_summary.json",
    "maps": "results/simulator",
    # its maps manifest: the disease map of each subject (remove for diseased, inject for
    # healthy subjects) is its primary method, `simulator`
    "manifest": "results/simulator/maps.json",
}
CONCEPTS3D = {
    "tcav": "results/concepts3d/tcav/tcav.json",
    "tcav_table": "results/concepts3d/tcav/tcav.tsv",
    "tcav_figure": "results/concepts3d/tcav/tcav.png",
    "tcav_cache": "results/concepts3d/tcav/cavs.pt",
    "sacv": "results/concepts3d/sacv/{concept}",
    # the maps manifest of a concept's SACV run (neuroexplain.concepts3d.run.sacv_manifest_name)
    "sacv_manifest": "results/concepts3d/sacv/{concept}/sacv{concept}_maps.json",
}
XNN = {
    "model": "results/xnn_model/srae.pt",
    "train": "results/xnn_model/srae_train.json",
    "train_log": "results/xnn_model/srae_train_log.tsv",
    "maps": "results/xnn",
    "manifest": "results/xnn/maps.json",
}
FIGURES = {
    "maps": "results/figures/maps",
    "regions": "results/figures/regions_logjacobian.png",
    "regions_table": "results/figures/regions_logjacobian.tsv",
}

# the maps manifest of each map-writing stage that is on (written into the stage's folder:
# its methods, their kinds and per-subject files; neuroexplain.stage.write_maps_manifest).
# evaluate_maps scores the manifests' methods against the cohort's ground truth, figures draws
# them; the method names are the package's, not rebuilt here
MAP_MANIFESTS = []
# stages among them whose maps are log-Jacobians (the region bars of the report)
LOGJACOBIAN_STAGES = []
if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["saliency"]["activate"]
):
    MAP_MANIFESTS.append(SALIENCY_MANIFEST)
if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["simulator"]["activate"]
):
    MAP_MANIFESTS.append(SIMULATOR["manifest"])
    LOGJACOBIAN_STAGES.append("simulate")
if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["concepts3d"]["activate"]
):
    MAP_MANIFESTS.extend(
        CONCEPTS3D["sacv_manifest"].format(concept=concept)
        for concept in config["concepts3d"]["sacv_concepts"]
    )
if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["xnn"]["activate"]
):
    MAP_MANIFESTS.append(XNN["manifest"])


def map_folders():
    """The stage folders (directory outputs) holding the registered manifests."""
    return sorted({str(Path(manifest).parent) for manifest in MAP_MANIFESTS})


ST_CONCEPTS = {
    "adata": f"results/st_concepts/{config['st']['name']}.h5ad",
    "figures": f"results/st_concepts/{config['st']['name']}_figures",
    "model": f"results/st_concepts/{config['st']['name']}_model",
    "metrics": f"results/st_concepts/{config['st']['name']}_metrics.json",
}


##### config checks the schema cannot express #####


def _config_error(key, problem):
    raise WorkflowError(f"config key {key}: {problem} (see config/README.md)")


if config["mri"]["bids"] and config["mri"]["sheet"]:
    _config_error("mri.bids / mri.sheet", "set at most one of them")
if (
    config["mri"]["activate"]
    and config["cohort"]["activate"]
    and config["mri"]["sheet"]
):
    _config_error(
        "cohort.activate",
        "the synthetic cohort is made from a BIDS dataset; use mri.bids, not mri.sheet",
    )
if config["cohort"]["magnitude"][0] > config["cohort"]["magnitude"][1]:
    _config_error("cohort.magnitude", "expected [smallest, largest]")
_st_sources = [k for k in ("counts", "h5ad", "visium") if config["st"][k]]
if len(_st_sources) > 1:
    _config_error("st", f"set only one of counts, h5ad, visium (got {_st_sources})")
if config["st"]["spots"] and not config["st"]["counts"]:
    _config_error("st.spots", "a spot table goes with st.counts")


##### threads and GPUs #####


def branch_threads(n=2):
    """Threads of a job that runs beside other branches (baseline maps, simulator, TCAV / SACV,
    XNN): `n`, but at most half the cores of a local run, so that on 2 cores two such jobs run
    side by side instead of one after the other. A cluster job (no local core count; or the
    job itself, running on its node) keeps `n`."""
    cores = workflow.global_resources.get("_cores")
    if workflow.remote_exec or not isinstance(cores, int):
        return n
    return max(1, min(n, cores // 2))


@functools.cache
def _local_gpu():
    """A GPU on this machine: `nvidia-smi` on the PATH and CUDA_VISIBLE_DEVICES not hiding it
    (a cheap check; importing torch to ask CUDA takes seconds)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return shutil.which("nvidia-smi") is not None


def gpu(wildcards):
    """The `gpu` resource of the GPU-capable rules, compute.gpu: 0 or 1 as configured; `auto` asks
    for a GPU (Slurm: --gpus=1) on a cluster, and locally only when the machine has one, so a
    CPU-only machine does not run its torch jobs one at a time under the profile's `gpu: 1`
    limit. Evaluated when a job is scheduled (when workflow.local_exec is known)."""
    setting = config["compute"]["gpu"]
    if setting != "auto":
        return int(setting)
    if not workflow.local_exec:
        return 1
    return int(_local_gpu())


##### datasets: configured path > local mirror > download into resources/ #####

IXI_RESOURCE = "resources/ixi"
MOB_FILES = {"counts": "mob_rep11_counts.csv.gz", "spots": "mob_rep11_spots.csv"}
MOB_RESOURCE = {key: f"resources/mob/{name}" for key, name in MOB_FILES.items()}


def mirrored(dataset):
    """Path of `dataset` in the local mirror (config data.mirror), or None if it is not there."""
    mirror = config["data"]["mirror"]
    if mirror and (Path(mirror) / dataset).is_dir():
        return str(Path(mirror) / dataset)
    return None


def ixi_root():
    """The IXI demo BIDS root: the mirror's copy, else the one fetch_ixi downloads."""
    return mirrored("ixi") or IXI_RESOURCE


def mob_tables():
    """The MOB demo counts and spot tables: the mirror's copy, else the ones fetch_mob downloads."""
    mob = mirrored("mob")
    if mob:
        return {key: str(Path(mob) / name) for key, name in MOB_FILES.items()}
    return dict(MOB_RESOURCE)


def mri_source():
    """{"bids": root} or {"sheet": path} of the configured MRI dataset (default: IXI demo)."""
    if config["mri"]["sheet"]:
        return {"sheet": config["mri"]["sheet"]}
    return {"bids": config["mri"]["bids"] or ixi_root()}


def mri_bids_root():
    """BIDS root whose images the ingested tensors come from (the cohort when it is made)."""
    if config["cohort"]["activate"]:
        return COHORT_DIR
    return mri_source().get("bids")


# the demo concepts of the synthetic cohort, shipped with the workflow (config/concepts3d.yaml)
REPO_ROOT = Path(workflow.current_basedir).parents[1]
DEMO_CONCEPTS = str(REPO_ROOT / "config" / "concepts3d.yaml")


def concepts_file():
    """Concept definitions of TCAV / SACV: concepts3d.concepts (relative to the working
    directory, else to the repository, where config/age.yaml's file lives), else the demo
    concepts."""
    path = config["concepts3d"]["concepts"]
    if not path:
        return DEMO_CONCEPTS
    repo_file = REPO_ROOT / path
    if not Path(path).is_absolute() and not Path(path).exists() and repo_file.is_file():
        return str(repo_file)
    return path


if config["concepts3d"]["activate"] and Path(concepts_file()).is_file():
    _concepts = strict_yaml(concepts_file()) or {}  # rules/config_files.smk
    _defined = _concepts.get("concepts") or {}
    _undefined = [c for c in config["concepts3d"]["sacv_concepts"] if c not in _defined]
    if _undefined:
        _config_error(
            "concepts3d.sacv_concepts",
            f"{_undefined} not defined in {concepts_file()} (defined: {sorted(_defined)})",
        )


def _args(*pairs):
    """Shell-quoted `--option value` pairs (a list value repeats the option); None skips it."""
    out = []
    for option, value in pairs:
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            out += [option, str(v)]
    return " ".join(shlex.quote(a) for a in out)


def _ints(values):
    return ",".join(str(v) for v in values)


##### input functions #####


def cohort_input(wildcards):
    """BIDS root the cohort is made from: mri.bids, else the IXI demo."""
    return mri_source()["bids"]


def ingest_mri_input(wildcards):
    if config["cohort"]["activate"]:
        return {"bids": COHORT_DIR}
    return mri_source()


def ingest_st_input(wildcards):
    st = config["st"]
    if st["h5ad"]:
        return {"h5ad": st["h5ad"]}
    if st["visium"]:
        return {"visium": st["visium"]}
    if st["counts"]:
        return {
            "counts": st["counts"],
            **({"spots": st["spots"]} if st["spots"] else {}),
        }
    return mob_tables()


##### params functions (CLI options) #####


def out_dir(wildcards, output):
    """Folder of the first output, for commands that take `--out <folder>`."""
    return str(Path(output[0]).parent)


def fetch_ixi_args(wildcards):
    return _args(("--limit", config["mri"]["limit"]))


def make_cohort_args(wildcards):
    cohort = config["cohort"]
    return _args(
        ("--derivatives", config["mri"]["derivatives"]),
        ("--shrink", _ints(cohort["shrink"])),
        ("--enlarge", _ints(cohort["enlarge"])),
        ("--fraction", cohort["fraction"]),
        ("--magnitude-min", cohort["magnitude"][0]),
        ("--magnitude-max", cohort["magnitude"][1]),
        ("--nuisance", cohort["nuisance"]),
        ("--label-probability", cohort["label_probability"]),
        ("--seed", config["seed"]),
        ("--limit", config["mri"]["limit"]),
    ) + (" --paired" if cohort["paired"] else " --unpaired")


def ingest_mri_args(wildcards, input):
    mri = config["mri"]
    positive_class = mri["positive_class"] or None
    if "sheet" in input.keys():  # a sheet has fixed columns: subject, t1, dseg, label
        source = [("--sheet", input.sheet)]
    else:
        label_column = mri["label_column"] or None
        source = [
            ("--bids", input.bids),
            ("--derivatives", mri["derivatives"]),
            ("--label-column", label_column),
        ]
        if label_column:
            source += [
                (
                    "--label-group",
                    [f"{k}={v}" for k, v in mri["label_groups"].items()] or None,
                )
            ]
        positive_class = positive_class if label_column else None
    return _args(
        *source,
        ("--positive-class", positive_class),
        ("--shape", mri["shape"]),
        ("--fov-mm", mri["fov_mm"]),
        ("--norm", mri["norm"]),
        ("--fg-threshold", mri["fg_threshold"]),
        ("--align", mri["align"] if mri["derivatives"] or mri["sheet"] else "none"),
        ("--mask", mri["mask"]),
        ("--mask-margin-mm", mri["mask_margin_mm"]),
        # the cohort already holds only mri.limit source subjects (two each when paired)
        ("--limit", None if config["cohort"]["activate"] else mri["limit"]),
    )


def ingest_st_args(wildcards, input):
    st = config["st"]
    return _args(
        *[
            (f"--{key}", input[key])
            for key in ("counts", "spots", "h5ad", "visium")
            if key in input.keys()
        ],
        ("--orientation", st["orientation"]),
        ("--spot-col", st["spot_col"] or None),
        ("--on-mismatch", st["on_mismatch"]),
        ("--label-key", st["label_key"]),
        ("--x-col", st["x_col"]),
        ("--y-col", st["y_col"]),
    )


def st_concepts_args(wildcards):
    stc = config["st_concepts"]
    return _args(
        ("--label-key", config["st"]["label_key"]),
        ("--seed", config["seed"]),
        ("--n-latent", stc["n_latent"]),
        ("--n-top-genes", stc["n_top_genes"]),
        ("--likelihood", stc["likelihood"]),
        ("--method", stc["method"]),
        ("--saliency", stc["saliency"]),
        ("--epochs", stc["epochs"]),
        ("--max-steps", stc["max_steps"]),
        ("--genemode-seeds", ",".join(stc["genemode_seeds"]) or None),
        ("--genemode-epochs", stc["genemode_epochs"]),
        ("--max-concepts", stc["max_concepts"]),
    )


def st_evaluate_args(wildcards):
    stc = config["st_concepts"]
    return _args(
        ("--label-key", config["st"]["label_key"]),
        ("--seed", config["seed"]),
        ("--n-top", stc["n_top"]),
        ("--markers", stc["markers"] or None),
    )


def train_classifier_args(wildcards):
    clf = config["classifier"]
    return (
        _args(
            ("--arch", clf["arch"]),
            ("--precision", config["compute"]["precision"]),
            ("--epochs", clf["epochs"]),
            ("--batch-size", clf["batch_size"]),
            ("--lr", clf["lr"]),
            ("--lr-schedule", clf["lr_schedule"]),
            ("--dropout", clf["dropout"]),
            ("--translate-vox", clf["translate_vox"]),
            ("--scale", clf["scale"]),
            ("--elastic-vox", clf["elastic_vox"]),
            ("--intensity", clf["intensity"]),
            ("--patience", clf["patience"]),
            ("--val-fraction", clf["val_fraction"]),
            ("--test-fraction", clf["test_fraction"]),
            ("--reference-ensemble", clf["reference_ensemble"]),
            ("--explain", clf["explain"]),
            ("--seed", config["seed"]),
        )
        + (" --augment" if clf["augment"] else " --no-augment")
        + (" --flip" if clf["flip"] else " --no-flip")
        + (" --standardize" if clf["standardize"] else " --no-standardize")
        + (
            " --reference-fallback"
            if clf["reference_fallback"]
            else " --no-reference-fallback"
        )
    )


def saliency_args(wildcards):
    sal = config["saliency"]
    return _args(
        ("--methods", ",".join(sal["methods"])),
        ("--layer", sal["layer"] or None),
        ("--ig-steps", sal["ig_steps"]),
        ("--smoothgrad-samples", sal["smoothgrad_samples"]),
        ("--occlusion-mask", sal["occlusion_mask"]),
        ("--occlusion-overlap", sal["occlusion_overlap"]),
        ("--subjects", config["evaluation"]["subjects"]),
        ("--seed", config["seed"]),
    )


def evaluate_maps_input(wildcards):
    """The cohort (ground truth), the split, and the folder of every registered manifest."""
    return {
        "cohort": COHORT_DIR,
        "split": CLASSIFIER["split"],
        "maps": map_folders(),
    }


def evaluation_stem(wildcards, output):
    """`--out` stem of evaluate-maps: its JSON output without the suffix."""
    return str(Path(output.json).with_suffix(""))


def evaluate_maps_args(wildcards, input):
    subjects = config["evaluation"]["subjects"]
    return _args(
        ("--subjects", "all" if subjects == "all" else input.split),
        ("--manifest", MAP_MANIFESTS),
        ("--split-name", subjects),
        ("--topk", ",".join(str(k) for k in config["evaluation"]["topk"])),
        ("--label-column", config["mri"]["label_column"]),
        ("--positive-class", config["mri"]["positive_class"]),
        ("--derivatives", config["mri"]["derivatives"]),
    )


def output_stem(wildcards, output):
    """The `json` output's path without its suffix (commands that write `<stem>.*`)."""
    return str(Path(output.json).with_suffix(""))


def region_reliance_args(wildcards):
    return _args(
        ("--regions", _regions()),
        ("--subjects", config["evaluation"]["subjects"]),
    )


def _regions():
    """`NAME=LABEL,LABEL` of each configured region (mri.regions)."""
    return [
        f"{name}={_ints(labels)}" for name, labels in config["mri"]["regions"].items()
    ]


def train_simulator_args(wildcards):
    sim = config["simulator"]
    return (
        _args(
            ("--epochs", sim["epochs"]),
            ("--max-epochs", sim["max_epochs"]),
            ("--objective", sim["objective"]),
            ("--objective-on", sim["objective_on"]),
            ("--w-cls-growth", sim["w_cls_growth"]),
            ("--batch-size", sim["batch_size"]),
            ("--lr", sim["lr"]),
            ("--experts", sim["experts"]),
            ("--channels", _ints(sim["channels"])),
            ("--downsample", sim["downsample"]),
            ("--margin", sim["margin"]),
            ("--hinge", sim["hinge"]),
            ("--w-cls", sim["w_cls"]),
            ("--w-cycle", sim["w_cycle"]),
            ("--w-smooth", sim["w_smooth"]),
            ("--w-magnitude", sim["w_magnitude"]),
            ("--w-volume", sim["w_volume"]),
            ("--smoothness", sim["smoothness"]),
            ("--max-steps", sim["max_steps"]),
            ("--precision", config["compute"]["precision"]),
            ("--seed", config["seed"]),
        )
        + (" --diffeomorphic" if sim["diffeomorphic"] else " --no-diffeomorphic")
        + (" --all-subjects" if sim["all_subjects"] else " --correct-only")
    )


def simulate_args(wildcards):
    sim = config["simulator"]
    return _args(
        ("--subjects", config["evaluation"]["subjects"]),
        ("--regions", _regions()),
        ("--map-direction", sim["map_direction"]),
    ) + (" --images" if sim["images"] else " --no-images")


def concepts3d_input(wildcards):
    """Images, classifier, split, quality gate, the concept file and, when known, the BIDS root
    whose participants.tsv gives the concepts' selector columns (e.g. diagnosis)."""
    inputs = {
        "preproc": MRI_INGEST["preproc"],
        "model": CLASSIFIER["model"],
        "split": CLASSIFIER["split"],
        "quality": CLASSIFIER["quality"],
        "concepts": concepts_file(),
    }
    if mri_bids_root():
        inputs["bids"] = mri_bids_root()
    return inputs


def participants_args(wildcards, input):
    """`--participants` of tcav / sacv: participants.tsv of the BIDS root, if any."""
    if "bids" not in input.keys():
        return ""
    return _args(("--participants", Path(input.bids) / "participants.tsv"))


def tcav_args(wildcards):
    c3d = config["concepts3d"]
    return _args(
        ("--layers", ",".join(c3d["tcav_layers"]) or None),
        ("--class-split", config["evaluation"]["subjects"]),
        ("--n-random", c3d["n_random"]),
        ("--alpha", c3d["alpha"]),
        ("--correction", c3d["correction"]),
        ("--min-accuracy", c3d["min_accuracy"]),
        ("--seed", config["seed"]),
    )


def sacv_args(wildcards):
    c3d = config["concepts3d"]
    return _args(
        ("--concept", wildcards.concept),
        ("--desc-label", wildcards.concept),
        ("--layer", c3d["sacv_layer"] or None),
        ("--subjects", config["evaluation"]["subjects"]),
        ("--transform", c3d["sacv_transform"]),
        ("--negatives", c3d["sacv_negatives"]),
        ("--relevance", c3d["sacv_relevance"]),
        ("--seed", config["seed"]),
    )


def xnn_train_args(wildcards):
    xnn = config["xnn"]
    return _args(
        ("--layer", xnn["layer"] or None),
        ("--pool", xnn["pool"]),
        ("--n-features", xnn["n_features"]),
        ("--hidden", xnn["hidden"]),
        ("--epochs", xnn["epochs"]),
        ("--lr", xnn["lr"]),
        ("--coverage", xnn["coverage"]),
        ("--seed", config["seed"]),
    )


def xnn_explain_args(wildcards):
    xnn = config["xnn"]
    return _args(
        ("--subjects", config["evaluation"]["subjects"]),
        ("--method", xnn["method"]),
        ("--ig-steps", xnn["ig_steps"]),
    )


def figures_input(wildcards):
    """Native T1w / dseg paths (ingest), the cohort, the split and the folder of every
    registered manifest."""
    inputs = {
        "subjects": MRI_INGEST["subjects"],
        "maps": map_folders(),
    }
    if config["cohort"]["activate"]:
        inputs["cohort"] = COHORT_DIR
    if config["classifier"]["activate"]:
        inputs["split"] = CLASSIFIER["split"]
    return inputs


def figures_regions_output():
    """The region bar figure and its table: only with a log-Jacobian to plot (the cohort's
    ground truth or the simulator's maps)."""
    if not (config["cohort"]["activate"] or LOGJACOBIAN_STAGES):
        return {}
    caption = "../report/figures_regions.rst"
    category = "Figures"
    return {
        "regions": report(FIGURES["regions"], caption=caption, category=category),
        "regions_table": report(
            FIGURES["regions_table"], caption=caption, category=category
        ),
    }


def figures_args(wildcards, input, output):
    has_split = "split" in input.keys()
    return _args(
        ("--cohort", input.cohort if "cohort" in input.keys() else None),
        ("--split", input.split if has_split else None),
        ("--split-name", config["evaluation"]["subjects"] if has_split else None),
        # the log-Jacobian maps (region bars) are the manifests' methods of that kind
        ("--manifest", MAP_MANIFESTS),
        ("--regions", _regions()),
        ("--regions-figure", output.regions if "regions" in output.keys() else None),
        ("--n-subjects", config["figures"]["n_subjects"]),
        ("--derivatives", config["mri"]["derivatives"]),
        ("--threshold", config["figures"]["threshold"]),
    )
