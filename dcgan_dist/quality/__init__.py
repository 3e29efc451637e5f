"""How good a generator is: the metrics' maths, the feature spaces they are computed in (the domain classifier,
TF-Inception for FID), the cached real references, sets of images, and evaluation of samples and of checkpoints
(during training: `train.evaluator`). Imports `registry`, `errors`, `fileio`, `gan`, `hub` (dcgan-eval's `assess`
reads generators through it) and `data`."""
