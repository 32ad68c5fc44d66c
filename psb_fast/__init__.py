"""psb_fast: exact math, fused kernels and few-NFE samplers for Phase Stochastic Bridges (AGM)."""

from .bridge import Coefficients, PhaseBridge
from .likelihood import likelihood
from .ops.bridge_sample import bridge_sample
from .ops.phase_step import phase_hop, phase_step
from .ops.sde_step import sde_step
from .sampler import PhaseSampler
from .tuning import tune

__all__ = [
    "Coefficients", "PhaseBridge", "PhaseSampler", "bridge_sample", "likelihood", "phase_hop", "phase_step",
    "sde_step", "tune",
]
__version__ = "0.1.0"
