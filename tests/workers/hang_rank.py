"""`pretrain ARGS...` under torchrun, except that rank R never gets its batch for step S (0-based):
its data iterator blocks forever, as a stuck data worker or a hung filesystem would.

argv: R S ARGS...
"""
import os
import sys
import time

import pretrain.engine.trainer as trainer

_rank, _step = int(sys.argv[1]), int(sys.argv[2])
_real = trainer.build_train_loader


def _hanging_loader(*args, **kwargs):
    loader = _real(*args, **kwargs)
    real_batches = loader.batches

    def batches(start=0, state=None):
        for i, b in enumerate(real_batches(start, state)):
            if int(os.environ["RANK"]) == _rank and start + i == _step:
                time.sleep(10 ** 6)
            yield b
    loader.batches = batches
    return loader


trainer.build_train_loader = _hanging_loader

from pretrain.cli import main  # noqa: E402

sys.exit(main(sys.argv[3:]))
