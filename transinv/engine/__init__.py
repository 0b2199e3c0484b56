"""The measuring engine: views, images, layers and hooks, metrics and their state, the loop, torchrun."""
