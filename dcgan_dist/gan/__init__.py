"""The GAN itself, blind to ranks, devices, precision and configs: the networks, the adversarial losses, the
differentiable augmentation D sees, and generating images from a generator. Imports only `registry` and `errors`."""
