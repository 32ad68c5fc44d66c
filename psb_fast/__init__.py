"""psb_fast: exact math, fused kernels and few-NFE samplers for Phase Stochastic Bridges (AGM)."""

from .bridge import Coefficients, PhaseBridge
from .sample_bridge import bridge_sample
from .sampler import PhaseSampler
from .stepping import phase_hop, phase_step, sde_step
from .tuning import tune

__all__ = [
    "Coefficients", "PhaseBridge", "PhaseSampler", "bridge_sample", "phase_hop", "phase_step", "sde_step",
    "tune",
]
__version__ = "0.1.0"
