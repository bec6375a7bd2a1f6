from pretrain.models.backbone import ModelError, check_input_size, check_model_name, create_backbone
from pretrain.models.ema import EMA, momentum_copy
from pretrain.models.heads import DINOHead, mlp_head
from pretrain.models.sync_bn import Fp32BatchNorm, GlobalBatchNorm, convert_sync_bn, convert_to_fp32_bn, convert_to_global_bn

__all__ = ["create_backbone", "check_model_name", "check_input_size", "ModelError", "EMA", "momentum_copy", "mlp_head", "DINOHead", "GlobalBatchNorm",
           "convert_sync_bn", "convert_to_global_bn", "Fp32BatchNorm", "convert_to_fp32_bn"]
