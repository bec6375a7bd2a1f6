"""The app's engine: backends, checkpointing, logging and the training loop."""
from pretrain.engine.trainer import plan, train

__all__ = ["train", "plan"]
