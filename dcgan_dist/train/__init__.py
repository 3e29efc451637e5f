"""Training: devices and precision, synchronized BatchNorm, the networks built for a device, EMA, the training
state a checkpoint holds, the interval statistics, tracking (metrics.jsonl, W&B, TensorBoard) and the trainer.
Imports everything below it (`gan`, `data`, `quality`, `checkpoint`, `config`, ...); nothing imports it but `cli`."""
