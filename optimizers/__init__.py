"""Orthonormal optimizers for matrices, with AdamW or Lion for the other parameters.

from optimizers import Dion2, Muon, NorMuon, Dion
"""

from optimizers.dion import Dion
from optimizers.dion2 import Dion2
from optimizers.muon import Muon
from optimizers.normuon import NorMuon
from optimizers.scalar import AdamWLion

__all__ = ["AdamWLion", "Dion", "Dion2", "Muon", "NorMuon"]
