from pretrain.losses.distributed import (all_reduce_sum_with_grad, gather_no_grad, gather_with_grad,
                                         shuffle_across_ranks, unshuffle_across_ranks)
from pretrain.losses.info_nce import info_nce, nt_xent, queue_info_nce

__all__ = ["nt_xent", "info_nce", "queue_info_nce", "gather_with_grad", "gather_no_grad", "all_reduce_sum_with_grad",
           "shuffle_across_ranks", "unshuffle_across_ranks"]
