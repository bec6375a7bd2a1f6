from pretrain.registry import Registry

METHODS = Registry("method")
