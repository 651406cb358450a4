# Helpers shared by all stages (config validation, dataset resolution, result paths, named
# input / params functions, the registry of final targets). Keep rules out of this file.

import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")


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
}
SALIENCY_DIR = "results/saliency"
EVALUATION = {
    "json": "results/evaluation/maps.json",
    "md": "results/evaluation/maps.md",
    "subjects": "results/evaluation/maps_subjects.tsv",
}
# method -> folder of its per-subject maps; each map-writing stage registers its methods here
# (evaluate_maps scores every registered method against the cohort's ground truth)
EVAL_MAPS = {}
if (
    config["mri"]["activate"]
    and config["classifier"]["activate"]
    and config["saliency"]["activate"]
):
    EVAL_MAPS.update({method: SALIENCY_DIR for method in config["saliency"]["methods"]})
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
        ("--seed", config["seed"]),
        ("--limit", config["mri"]["limit"]),
    )


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
        positive_class = positive_class if label_column else None
    return _args(
        *source,
        ("--positive-class", positive_class),
        ("--shape", mri["shape"]),
        ("--fov-mm", mri["fov_mm"]),
        ("--norm", mri["norm"]),
        ("--fg-threshold", mri["fg_threshold"]),
        ("--align", mri["align"] if mri["derivatives"] or mri["sheet"] else "none"),
        ("--limit", mri["limit"]),
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
        ("--genemode-seeds", ",".join(stc["genemode_seeds"]) or None),
        ("--genemode-epochs", stc["genemode_epochs"]),
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
            ("--epochs", clf["epochs"]),
            ("--batch-size", clf["batch_size"]),
            ("--lr", clf["lr"]),
            ("--patience", clf["patience"]),
            ("--val-fraction", clf["val_fraction"]),
            ("--test-fraction", clf["test_fraction"]),
            ("--seed", config["seed"]),
        )
        + (" --augment" if clf["augment"] else " --no-augment")
        + (" --flip" if clf["flip"] else " --no-flip")
    )


def saliency_args(wildcards):
    sal = config["saliency"]
    return _args(
        ("--methods", ",".join(sal["methods"])),
        ("--layer", sal["layer"] or None),
        ("--subjects", sal["subjects"]),
        ("--seed", config["seed"]),
    )


def evaluate_maps_input(wildcards):
    """The cohort (ground truth), the split, and every registered map folder."""
    return {
        "cohort": COHORT_DIR,
        "split": CLASSIFIER["split"],
        "maps": sorted(set(EVAL_MAPS.values())),
    }


def evaluation_stem(wildcards, output):
    """`--out` stem of evaluate-maps: its JSON output without the suffix."""
    return str(Path(output.json).with_suffix(""))


def evaluate_maps_args(wildcards):
    return _args(
        *[("--maps", f"{method}={folder}") for method, folder in EVAL_MAPS.items()],
        ("--split-name", config["saliency"]["subjects"]),
        ("--topk", ",".join(str(k) for k in config["evaluation"]["topk"])),
        ("--label-column", config["mri"]["label_column"]),
        ("--positive-class", config["mri"]["positive_class"]),
        ("--derivatives", config["mri"]["derivatives"]),
    )
