"""pretrain: self-supervised and generative pretraining of timm backbones on WebDataset shards.

The library (``pretrain.data``, ``pretrain.models``, ``pretrain.methods``, ``pretrain.losses``,
``pretrain.evaluation``) has no launch code in it; the app (``pretrain.engine``, ``pretrain.dist``,
``pretrain.cli``) builds on it.
"""
__version__ = "0.1.0"
