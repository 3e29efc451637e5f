"""How good a generator is: the metrics' maths, the feature spaces they are computed in (the domain classifier,
TF-Inception for FID), the real references, and evaluation of samples, of checkpoints and during training.
Imports `registry`, `errors`, `fileio`, `gan`, `hub` (dcgan-eval's `assess` reads generators through it) and `data`."""
