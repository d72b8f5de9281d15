"""Attacks by name; one module per attack, one shared interface (`Attack`, `BlackBoxAttack`)."""

from igat_core.attacks.autoattack import COMPONENTS as AUTOATTACK_COMPONENTS
from igat_core.attacks.autoattack import AutoAttack
from igat_core.attacks.bandits import Bandits
from igat_core.attacks.base import (EPS_TOLERANCE, Attack, AttackSettings, BlackBoxAttack, OutputBounds, cross_entropy,
                                    margin_loss, project_linf)
from igat_core.attacks.cw import CWLinf
from igat_core.attacks.logit_pgd import LogitPGD
from igat_core.attacks.mim import MIM
from igat_core.attacks.mora import MORA
from igat_core.attacks.pgd import FGSM, PGD
from igat_core.attacks.signhunter import SignHunter
from igat_core.attacks.simba import SimBA
from igat_core.attacks.transfer import Transfer, TransferSource

ATTACKS: dict[str, type[Attack]] = {a.name: a for a in (PGD, FGSM, CWLinf, MIM, AutoAttack, SignHunter, SimBA, Bandits,
                                                    MORA, LogitPGD, Transfer)}

__all__ = ["ATTACKS", "AUTOATTACK_COMPONENTS", "EPS_TOLERANCE", "MORA", "Attack", "AttackSettings", "AutoAttack",
           "Bandits", "BlackBoxAttack", "CWLinf", "FGSM", "LogitPGD", "MIM", "OutputBounds", "PGD", "SignHunter",
           "SimBA", "Transfer", "TransferSource", "cross_entropy", "margin_loss", "project_linf"]
