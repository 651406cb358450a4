# Strict reading of the config files, before Snakemake merges them (included by the Snakefile
# ahead of `configfile:`). Snakemake's reader keeps the last of two equal keys without a word
# (`mri:` twice drops the first block) and reports a YAML syntax error without file or line;
# here either stops the run with "invalid config (<file>:<line>): <problem>". Files given with
# --configfile are parsed by Snakemake before any workflow code runs: for them a syntax error
# keeps Snakemake's message, a duplicate key is caught here. The other helpers are in common.smk.

import importlib.util
import os
from pathlib import Path

from snakemake.exceptions import WorkflowError

# the reader is neuroexplain.io.config; where Snakemake runs outside the package's
# environment, the module (standard library and PyYAML only) is loaded from its file
_READER = Path(workflow.current_basedir).parents[1] / "src/neuroexplain/io/config.py"
try:
    from neuroexplain.io.config import ConfigFileError, load_yaml_strict
except ImportError:
    _spec = importlib.util.spec_from_file_location("neuroexplain_io_config", _READER)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    ConfigFileError = _module.ConfigFileError
    load_yaml_strict = _module.load_yaml_strict


def strict_yaml(path):
    """Parse a YAML file; a duplicate key or a syntax error stops the run with file and line."""
    try:
        return load_yaml_strict(path)
    except ConfigFileError as exc:
        raise WorkflowError(f"invalid config ({exc.where}): {exc.problem}") from None


# the --configfile files, then the Snakefile's own (its path is relative to the working folder)
for _configfile in [*workflow.configfiles, "config/config.yaml"]:
    if os.path.isfile(_configfile):
        strict_yaml(os.path.abspath(_configfile))
