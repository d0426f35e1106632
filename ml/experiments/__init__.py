"""Research options measured against the recipe: none of them is in the shipped model's path.

Objectives (a source adversary, group DRO) plug into ml.training.loop.fit; preprocessing
versions 3 and 4 register with ml.preprocess when ml.experiments.preprocessing is imported;
ml.experiments.compare sets evaluation reports side by side; ml.experiments.gradcam is the
reference Grad-CAM the served class-activation maps are tested against;
ml.experiments.gate_variants measures the input gate's alternatives. Results:
docs/experiments/README.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ml.training.objective import PLAIN, Objective


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """The experimental objectives' options (all off by default)."""
    g = parser.add_argument_group("experimental objectives (ml.experiments; off by default)")
    g.add_argument(
        "--source-adversary",
        type=float,
        default=0.0,
        metavar="SCALE",
        help="train against a class-conditional source classifier through gradient reversal "
        "of this strength (ml.experiments.adversary), so that the features stop telling the "
        "collections of a class apart",
    )
    g.add_argument(
        "--adversary-loss",
        choices=("reversal", "confusion"),
        default="reversal",
        help="with --source-adversary: reversal maximises the adversary's loss (unbounded); "
        "confusion makes its output match the per-class source prior (bounded)",
    )
    g.add_argument(
        "--adversary-ramp",
        action="store_true",
        help="with --source-adversary: grow the reversal from 0 in the first epoch to SCALE",
    )
    g.add_argument(
        "--group-dro",
        type=float,
        default=0.0,
        metavar="ETA",
        help="group DRO (ml.experiments.dro): minimise the loss of the worst (source, class) "
        "group of train, its weights moving at step size ETA (e.g. 0.01)",
    )
    g.add_argument(
        "--distill-from",
        metavar="MODEL_DIR",
        help="knowledge distillation (ml.experiments.distill): also fit this model's "
        "probabilities on the same augmented batches (e.g. a fine-tuned pretrained teacher)",
    )
    g.add_argument(
        "--distill-alpha",
        type=float,
        default=0.5,
        help="with --distill-from: weight of the labels' loss; 1 - alpha goes to the "
        "teacher's (default: %(default)s)",
    )


def objective_from(values: Mapping[str, Any]) -> Objective:
    """The objective the parsed options ask for; ValueError for a combination that cannot be."""
    adversary, dro = values.get("source_adversary", 0.0), values.get("group_dro", 0.0)
    if adversary < 0 or dro < 0:
        raise ValueError("--source-adversary and --group-dro must not be negative")
    ramp, loss = values.get("adversary_ramp", False), values.get("adversary_loss", "reversal")
    if (ramp or loss != "reversal") and not adversary:
        raise ValueError("--adversary-ramp and --adversary-loss need --source-adversary")
    if dro and (adversary or values.get("balance_sources")):
        raise ValueError("--group-dro replaces --balance-sources and --source-adversary")
    teacher = values.get("distill_from")
    if teacher and (adversary or dro):
        raise ValueError("--distill-from goes with neither --source-adversary nor --group-dro")
    if teacher:
        from ml.experiments.distill import Distillation

        return Distillation(teacher, values.get("distill_alpha", 0.5))
    if adversary:
        from ml.experiments.adversary import SourceAdversary

        return SourceAdversary(adversary, loss, ramp)
    if dro:
        from ml.experiments.dro import GroupDROObjective

        return GroupDROObjective(dro)
    return PLAIN
