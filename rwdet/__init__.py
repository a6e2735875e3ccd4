"""rwdet: network wiring as a first-class object.

Random graphs (RandWire), learned wirings (DNW) and hidden subnetworks (edge-popup) share one
graph-to-module builder; see ``rwdet.graphs``, ``rwdet.nn`` and ``rwdet.models``.
"""

__version__ = "0.1.0"

import warnings as _warnings

# fvcore.nn (imported by detectron2 and rwdet's FLOP counts) calls torch.jit.script at import
# time; torch >= 2.10 then warns on every run of every tool, above the tool's own output. The
# warning is about fvcore's code, not the user's: silence exactly that message.
_warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)
