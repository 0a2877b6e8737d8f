"""`index` (which packs the corpus first) under torchrun, the second process arriving late: it must take the
main process's decisions (pack or not, build or not) and meet it in the same collectives, not find the
main process's fresh files and skip the barriers the main process waits in.

    torchrun --nproc_per_node 2 tests/workers/distributed_late_rank.py RUN.yaml SECONDS
"""

import sys
import time

from ekfac_influence import distributed, run
from ekfac_influence.run_config import load_run_config


def main(config_path: str, delay: float):
    config = load_run_config(config_path)
    if distributed.rank() == 1:
        time.sleep(delay)  # the main process has packed the corpus and built the index by now
    run.index(config, show_progress=False)
    print(f"rank {distributed.rank()}: done, {distributed.sum_scalar(1.0):g} processes", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
