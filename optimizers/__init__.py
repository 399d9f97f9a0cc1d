"""Orthonormal optimizers for matrices, with AdamW or Lion for the other parameters.

from optimizers import Dion2, NorDion2, Muon, NorMuon, Dion
"""

from optimizers.adamw_lion import AdamWLion
from optimizers.dion import Dion
from optimizers.dion2 import Dion2
from optimizers.muon import Muon
from optimizers.nordion2 import NorDion2
from optimizers.normuon import NorMuon

# microsoft/dion's name for NorDion2, the third generation of Dion: the same class.
Dion3 = NorDion2

__all__ = ["AdamWLion", "Dion", "Dion2", "Dion3", "Muon", "NorDion2", "NorMuon"]
