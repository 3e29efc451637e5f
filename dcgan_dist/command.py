"""How every command runs: one-line errors and the exit status (`run_command`), argument errors (`Parser`).

Exit status: 0 done; 2 a user mistake (`UserError`, printed as one line); 1 the run cannot go on
(`RunError`: diverged, disk full; one line, what was saved is intact); 75 stopped by a signal after
writing a checkpoint (requeue). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable

from dcgan_dist import launcher

EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 1
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue with train.resume=auto
# What gloo and NCCL say when the rank at the other end of a collective is gone
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "Timed out waiting")


DISK_FULL_TRAIN = "checkpoints already written are intact: free space and continue with train.resume=auto"


def run_command(fn: Callable[[], None], disk_full: str = DISK_FULL_TRAIN) -> None:
    """Run a command: its UserError/RunError as one line (exit 2/1), a full disk as one line saying `disk_full`, a
    collective that lost its peer as one line (exit 1) on whichever rank it happens."""
    from dcgan_dist.errors import RunError, UserError

    try:
        fn()
    except (UserError, RunError) as e:
        if launcher.place().rank == 0:  # one line per job, not one per rank
            print(f"{_error()} {e}", file=sys.stderr, flush=True)
        else:  # the other ranks hit the same error: let rank 0 print before the launcher tears the job down
            time.sleep(3)
        sys.exit(EXIT_USER_ERROR if isinstance(e, UserError) else EXIT_RUN_ERROR)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        if not any(m in str(e) for m in PEER_LOST):
            raise
        # Another rank failed first and printed why (or was killed); this one only lost the connection.
        print(f"{_error()} rank {launcher.place().rank} stopped: another rank of the job failed or was killed "
              "(its error, if any, is above)", file=sys.stderr, flush=True)
        sys.exit(EXIT_RUN_ERROR)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"{_error()} no space left on device writing {e.filename or 'a file'}; {disk_full}", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_RUN_ERROR)


def _error() -> str:
    """How an error line starts; in a worker group that the launcher restarted, which restart it is."""
    if not launcher.attempt():
        return "error:"
    return f"error (restart {launcher.attempt()} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}):"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit status is 2 too; keep it to one line
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")
