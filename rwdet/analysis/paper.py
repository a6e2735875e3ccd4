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

# DNW Table 3 (MobileNetV1 x d, 224 px): model -> (params M, FLOPs M). DNW rows are after
# training, when dead nodes are skipped; at initialisation a DNW graph equals a random graph.
DNW_TABLE3 = {
    "mobilenetv1_rg_x0225": (1.2, 55.7),
    "mobilenetv1_dnw_x0225": (1.1, 42.1),
    "mobilenetv1_dnw_small_x0225": (0.4, 41.2),
    "mobilenetv1_dnw_small_x015": (0.24, 22.1),
    "mobilenetv1_dnw_x03": (1.3, 66.7),
    "mobilenetv1_rg_x049": (1.8, 170.0),
    "mobilenetv1_dnw_x049": (1.8, 154.0),
}
