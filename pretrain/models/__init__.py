from pretrain.models.backbone import ModelError, check_model_name, create_backbone
from pretrain.models.heads import mlp_head
from pretrain.models.sync_bn import GlobalBatchNorm, convert_sync_bn, convert_to_global_bn

__all__ = ["create_backbone", "check_model_name", "ModelError", "mlp_head", "GlobalBatchNorm",
           "convert_sync_bn", "convert_to_global_bn"]
