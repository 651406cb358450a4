"""Conditional warping simulator and Jacobian-determinant disease maps.

Liu, Adeli, Pohl and Zhao (IPMI 2021, "Going Beyond Saliency Maps: Training Deep Models to
Interpret Deep Models"): a U-Net of conditional convolutions deforms an image so that a frozen
classifier's decision moves towards (``o = -1``, inject) or away from (``o = +1``, remove) the
disease; the Jacobian determinant of the deformation is the explanation.

Modules: :mod:`.condconv` (CondConv3d), :mod:`.network` (SimulatorNet), :mod:`.train`
(losses, frozen-classifier training, checkpoints), :mod:`.maps` (disease maps, native-space
outputs, region tables).
"""

from __future__ import annotations

from neuroexplain.simulator.condconv import CondConv3d
from neuroexplain.simulator.maps import (
    DIRECTIONS,
    ddf_to_world,
    disease_jacobian,
    disease_log_jacobian,
    group_stats,
    invert_displacement,
    region_means,
    run_simulate,
    simulate,
    warp_native,
)
from neuroexplain.simulator.network import SimulatorConfig, SimulatorNet
from neuroexplain.simulator.train import (
    TrainConfig,
    freeze,
    load_simulator,
    logit_of,
    logit_shift_loss,
    run_train_simulator,
    save_simulator,
    select_training_subjects,
    train_simulator,
)

__all__ = [
    "DIRECTIONS",
    "CondConv3d",
    "SimulatorConfig",
    "SimulatorNet",
    "TrainConfig",
    "ddf_to_world",
    "disease_jacobian",
    "disease_log_jacobian",
    "freeze",
    "group_stats",
    "invert_displacement",
    "load_simulator",
    "logit_of",
    "logit_shift_loss",
    "region_means",
    "run_simulate",
    "run_train_simulator",
    "save_simulator",
    "select_training_subjects",
    "simulate",
    "train_simulator",
    "warp_native",
]
