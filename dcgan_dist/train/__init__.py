"""Training: devices and precision, synchronized BatchNorm, the networks built for a device, EMA, the training
state a checkpoint holds, the optimizer updates, the interval statistics, the run directory's owner, tracking
(metrics.jsonl, W&B, TensorBoard), evaluation while training and the trainer. Imports everything below it (`gan`,
`data`, `quality`, `checkpoint`, `config`, ...); nothing imports it but `cli`."""
