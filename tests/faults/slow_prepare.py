"""`dcgan-prepare` with a slow decoder, injected from the test side (the package reads no test variable), so a
test can kill a preparation between two shards reliably.

usage: python tests/faults/slow_prepare.py [dcgan-prepare arguments]   (use --workers 1: decoding in-process)
  FAULT_DECODE_DELAY=SECONDS   every image decode sleeps this long first (default 0.1)
"""

import os
import time

from dcgan_dist import cli
from dcgan_dist.data import decode

delay = float(os.environ.get("FAULT_DECODE_DELAY", "0.1"))
decode_image = decode.decode_image


def slow_decode_image(*args, **kwargs):
    time.sleep(delay)
    return decode_image(*args, **kwargs)


decode.decode_image = slow_decode_image  # what decode._decode_into calls (in this process with --workers 1)
if __name__ == "__main__":
    cli.prepare_main()
