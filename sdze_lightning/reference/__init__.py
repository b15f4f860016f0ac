"""Reference solutions computed by our own code (no downloads)."""

from sdze_lightning.reference.allen_cahn import AllenCahnReference, ETDRK4Coefficients, etdrk4
from sdze_lightning.reference.burgers import burgers_cole_hopf
from sdze_lightning.reference.hjb import ColeHopfReference, cole_hopf_quadrature

__all__ = [
    "AllenCahnReference",
    "ColeHopfReference",
    "ETDRK4Coefficients",
    "burgers_cole_hopf",
    "cole_hopf_quadrature",
    "etdrk4",
]
