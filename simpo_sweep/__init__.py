"""simpo-sweep: hyperparameter sweeps of SimPO preference optimisation on Ray, tracked in MLflow.

The objective is importable on its own for use in any training loop:

    from simpo_sweep import simpo_loss, sequence_logps
"""

from simpo_sweep.engine.loss import SimPOLoss, sequence_logps, simpo_loss

__all__ = ["SimPOLoss", "__version__", "sequence_logps", "simpo_loss"]
__version__ = "0.1.0"
