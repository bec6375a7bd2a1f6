from pretrain.losses.distributed import all_reduce_sum_with_grad, gather_no_grad, gather_with_grad, world_info
from pretrain.losses.info_nce import nt_xent

__all__ = ["nt_xent", "gather_with_grad", "gather_no_grad", "all_reduce_sum_with_grad", "world_info"]
