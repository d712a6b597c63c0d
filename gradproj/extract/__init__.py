"""The extraction command: dataset -> gradients -> (projections) -> shards and manifests.

`config` holds the options and the outputs they ask for, `layout` where each output goes,
`slurm` a job array task's share and preemption, `run` the loop.
"""

from gradproj.extract.config import ExtractConfig
from gradproj.extract.layout import run_dir, run_dirs
from gradproj.extract.run import run_extraction
from gradproj.extract.slurm import array_share, task_range

__all__ = ["ExtractConfig", "array_share", "run_dir", "run_dirs", "run_extraction", "task_range"]
