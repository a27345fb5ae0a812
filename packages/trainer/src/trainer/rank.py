"""``python -m trainer.rank``: one rank of a local launch (:class:`trainer.launch.LocalLauncher`).

The environment gives the rank, the world and the launcher's store; ``TRAINER_RUN_DIR`` holds the run's
configuration, and receives this rank's error (one line and its exit code) or rank 0's records.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from . import exits
from .reports import write_error, write_records


def main() -> int:
    """Train this rank; returns its exit code (:mod:`trainer.exits`)."""
    from .launch import train_here

    run_dir = Path(os.environ["TRAINER_RUN_DIR"])
    rank = int(os.environ["RANK"])
    try:
        records = train_here((run_dir / "config.toml").read_text(), int(os.environ["LOCAL_WORLD_SIZE"]))
    except exits.Interrupted as stop:
        return stop.exit_code
    except exits.USER_ERRORS as error:
        write_error(run_dir, rank, exits.exit_code(error), str(error))
        return exits.exit_code(error)
    except BaseException as error:  # a bug: the traceback goes to the log, tagged with the rank
        print(f"trainer: rank {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        write_error(run_dir, rank, exits.BUG, f"{type(error).__name__}: {error} (traceback above)")
        return exits.BUG
    if rank == 0:
        write_records(run_dir, records)
    return exits.OK


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a dead peer's process group cannot block the exit
