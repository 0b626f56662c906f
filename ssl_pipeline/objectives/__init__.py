"""Self-supervised objectives, one module each. An objective is built from the encoder and its config
section (pretrain.<name>) and turns the encoder's features of two views into a loss; see
common.Objective for the interface. To add one: write its module, add it to OBJECTIVES, give it a
config section in config/config.yaml and the schema."""
from ssl_pipeline.objectives.barlow_twins import BarlowTwins
from ssl_pipeline.objectives.byol import BYOL
from ssl_pipeline.objectives.common import (COLLAPSE_FACTOR, Objective, embedding_std, gather_from_all_ranks,
                                            is_collapsed)
from ssl_pipeline.objectives.moco_v2 import MoCoV2
from ssl_pipeline.objectives.simclr import SimCLR, nt_xent
from ssl_pipeline.objectives.vicreg import VICReg

OBJECTIVES = {"simclr": SimCLR, "byol": BYOL, "vicreg": VICReg, "barlow_twins": BarlowTwins, "moco_v2": MoCoV2}


def build_objective(name: str, encoder, settings: dict) -> Objective:
    """settings: config pretrain.<name>. Target networks start as copies of `encoder`: build the
    objective after the encoder is on its device and initialised."""
    return OBJECTIVES[name](encoder, settings)


__all__ = ["COLLAPSE_FACTOR", "OBJECTIVES", "Objective", "build_objective", "embedding_std", "gather_from_all_ranks",
           "is_collapsed", "nt_xent"]
