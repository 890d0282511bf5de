"""What the driver decides once and hands every worker (launch.py carries it to the in-process worker, to each
Ray actor, and to torchrun ranks from rank 0): nobody re-opens the checkpoint, re-plans or re-validates."""

from dataclasses import dataclass, replace

from .checkpoint import CheckpointInfo
from .config import PruneConfig
from .memory import MemoryPlan
from .models import Family
from .registry import Method, method


@dataclass(frozen=True)
class Resolved:
    config: PruneConfig  # validated; residency and activation storage decided by the plan
    info: CheckpointInfo  # the checkpoint, checked (config.json, files, shapes)
    plan: MemoryPlan  # the memory plan of the run as it will go
    nm: tuple[int, int] | None  # the N:M pattern, parsed

    @property
    def method(self) -> Method:
        return method(self.config.prune.method)

    @property
    def family(self) -> Family:
        return self.info.family

    def resumed(self) -> "Resolved":
        """The same run, continued from its last verified layer (a restart after a worker died)."""
        return replace(self, config=replace(self.config, runtime=replace(self.config.runtime, resume=True)))
