"""Entry script for `ray submit` and `ray job submit`: runs `dist-prune prune` on an existing Ray cluster.

    ray submit launchers/prune70b.yaml launchers/prune_job.py -- --config configs/llama2-70b-gblm-50.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- python launchers/prune_job.py --config ...

Any `dist-prune prune` flag may follow; the launcher is forced to Ray and the cluster is the one this
script runs in (RAY_ADDRESS=auto), so the actors land on the cluster's GPUs.
"""

import os
import sys

from dist_prune.cli import main

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(["prune", *sys.argv[1:], "--launcher", "ray"]))
