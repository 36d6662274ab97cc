"""Count the reads of tensor values that the project's own code makes.

On a GPU every such read (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, an index)
waits for the device queue to drain. CUDA can report them (``torch.cuda.set_sync_debug_mode``);
this mode counts them anywhere, the CPU included, so tests and benchmarks can hold the train
step to its budget of one per optimizer step without a GPU.

Host tensors (the data loader's batches, the CPU-side collectives) are read through
``.numpy()``, which refuses device tensors outright: such reads cannot hide a sync, and are
not counted. Reads made inside torch (an optimizer's CPU step counter, say) are not counted
either: only those whose caller is a file of this package.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.overrides import TorchFunctionMode

_PACKAGE = str(Path(__file__).resolve().parents[1])
_READS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__"})


class DeviceReads(TorchFunctionMode):
    """``with DeviceReads() as reads: ...`` then ``reads.calls``: one ``"file:function read"``
    entry per read, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(_PACKAGE):
                where = f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}"
                self.calls.append(f"{where} {func.__name__}")
        return func(*args, **(kwargs or {}))
