"""`dcgan-train` with faults injected from the test side (the package reads no test variable).

usage: python tests/faults/faulty_train.py [dcgan-train arguments]   (or under `accelerate launch`)
  FAULT_NONFINITE="STEP,STEP[@RANK]"  D's fake loss is NaN at these 1-based steps (on RANK only, default all)
  FAULT_CHECKPOINT_DELAY=SECONDS      every checkpoint file write sleeps this long after writing (widens the
                                      window in which a kill lands inside a checkpoint write)
  FAULT_DECODE_DELAY=SECONDS          every image decode sleeps this long first (a slow first preparation of an
                                      image folder; the decoding workers re-import this script, so they sleep too)
  FAULT_HANG_AT_START=RANK@ATTEMPT    that rank of that attempt of a restarted worker group (TORCHELASTIC_RESTART_COUNT)
                                      sleeps before it joins the process group, as a rank stuck on a bad node
"""

import os
import time

from dcgan_dist import checkpoint, cli
from dcgan_dist.data import decode
from dcgan_dist.train import trainer


class FaultyTrainer(trainer.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        steps_at, _, rank = os.environ.get("FAULT_NONFINITE", "").partition("@")
        nan_at = {int(x) for x in steps_at.split(",") if x} if rank in ("", str(self.rank)) else set()
        d_fake = self.loss.d_fake
        self.loss.d_fake = lambda logits: d_fake(logits) * (float("nan") if self.step + 1 in nan_at else 1.0)


delay = float(os.environ.get("FAULT_CHECKPOINT_DELAY", "0"))
if delay:
    save_file = checkpoint.save_file

    def slow_save_file(*args, **kwargs):
        save_file(*args, **kwargs)
        time.sleep(delay)

    checkpoint.save_file = slow_save_file

decode_delay = float(os.environ.get("FAULT_DECODE_DELAY", "0"))
if decode_delay:
    decode_image = decode.decode_image

    def slow_decode_image(*args, **kwargs):
        time.sleep(decode_delay)
        return decode_image(*args, **kwargs)

    decode.decode_image = slow_decode_image

hang_rank, _, hang_attempt = os.environ.get("FAULT_HANG_AT_START", "").partition("@")
if hang_rank and (os.environ.get("RANK"), os.environ.get("TORCHELASTIC_RESTART_COUNT")) == (hang_rank, hang_attempt):
    time.sleep(3600)

trainer.Trainer = FaultyTrainer  # what cli.train_main builds
if __name__ == "__main__":
    cli.train_main()
