"""`evaluate` under `accelerate launch`: each rank generates its share of the noise; rank 0 writes the metrics.

usage: eval_worker.py CHECKPOINT CLASSIFIER NUM SEED OUT_JSON
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from dcgan_dist.quality.evaluation import classifier_space, evaluate, labelled_data, load_classifier
from dcgan_dist.checkpoint import load_generator

ckpt, classifier, num, seed, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
acc = Accelerator(cpu=True)
generator, _, _ = load_generator(ckpt)
model, meta = load_classifier(classifier)
space = classifier_space(model, meta, *labelled_data(meta["data"], "data", meta["image_size"]))
metrics = evaluate(generator, num, [space], seed=seed, batch_size=16, accelerator=acc)
if acc.is_main_process:
    Path(out).write_text(json.dumps({"world": acc.num_processes, "metrics": metrics}))
acc.wait_for_everyone()
acc.end_training()
