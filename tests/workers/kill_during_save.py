"""`pretrain ARGS...`, except that the Nth torch.save writes half a file and kills the process
(os._exit: no cleanup handlers run), as a power cut or SIGKILL in the middle of a checkpoint would.

argv: N ARGS...
"""
import os
import sys

import torch

_real_save, _calls, _die_at = torch.save, [0], int(sys.argv[1])


def _dying_save(obj, f, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == _die_at:
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\x00" * 1000)   # the start of a zip that never gets finished
            fh.flush()
        os._exit(17)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _dying_save

from pretrain.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
