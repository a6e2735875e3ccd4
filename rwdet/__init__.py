"""rwdet: network wiring as a first-class object.

Random graphs (RandWire), learned wirings (DNW) and hidden subnetworks (edge-popup) share one
graph-to-module builder; see ``rwdet.graphs``, ``rwdet.nn`` and ``rwdet.models``.
"""

__version__ = "0.1.0"
