"""Entry point for `accelerate launch launch/train.py --config configs/X.yaml [section.key=value ...]`."""

from dcgan_dist.cli import train_main

if __name__ == "__main__":
    train_main()
