"""Attacks by name; one module per attack, one shared interface (`Attack`)."""

from igat_core.attacks.base import Attack, project_linf
from igat_core.attacks.pgd import FGSM, PGD

ATTACKS: dict[str, type[Attack]] = {"pgd": PGD, "fgsm": FGSM}

__all__ = ["ATTACKS", "Attack", "FGSM", "PGD", "project_linf"]
