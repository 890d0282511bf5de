"""dist_prune: sharded pruning of LLaMA-family checkpoints (GBLM-Pruner, Wanda, SparseGPT, magnitude).

Importing the package loads neither Ray nor the model code: the heavy modules load when a job runs.
"""

__version__ = "0.1.0"

from .api import Report, evaluate, plan, prune  # noqa: E402
from .config import PruneConfig, load_config  # noqa: E402
from .errors import DistPruneError  # noqa: E402

__all__ = ["DistPruneError", "PruneConfig", "Report", "evaluate", "load_config", "plan", "prune"]
