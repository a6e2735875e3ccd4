"""Numbers reported in the papers, for side-by-side comparison (mean, std over seeds 1-5).

FLOPs in millions of multiply-adds, params in millions. RandWire Tables 2-4 use WS(4, 0.75).
"""

RANDWIRE = {
    # model: (input size, FLOPs mean, FLOPs std, params mean, params std, source)
    "randwire_small": (224, 583.0, 6.2, 5.6, 0.1, "RandWire Table 2"),
    "randwire_c109": (224, 4000.0, 90.0, 31.9, 0.66, "RandWire Table 3"),
    "randwire_c154": (224, 7900.0, 180.0, 61.5, 1.32, "RandWire Table 3"),
    "randwire_c154@320": (320, 16000.0, 360.0, 61.5, 1.32, "RandWire Table 4"),
}
