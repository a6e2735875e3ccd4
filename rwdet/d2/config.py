"""``add_rwdet_config``: the ``MODEL.RWDET`` keys that describe an rwdet detection backbone.

Empty / negative values mean "not set here": the value then comes from the weights file made by
``tools/convert_cls_to_d2.py`` (which carries the classification model's spec and graphs) or,
without such weights, from the model's registered defaults. A value set both here and in the
weights must agree, otherwise building the backbone stops with an error naming both.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

NORMS = ("FrozenBN", "BN", "SyncBN", "GN")
STEMS = ("", "imagenet", "small")


def add_rwdet_config(cfg: CN) -> None:
    """Add the rwdet keys to a detectron2 config (call before ``merge_from_file``)."""
    _C = cfg
    _C.MODEL.RWDET = CN()
    # Registered rwdet model name (``rwdet.models.list_models()``), e.g. "randwire_c109",
    # "mobilenetv1_dnw_x0225", "resnet50_popup". Empty: take it from the weights file.
    _C.MODEL.RWDET.NAME = ""
    # Random graph generator of the stages: "er", "ba", "ws" or "complete". Empty: the weights'
    # embedded graphs (or the model default). Set together with weights, it must reproduce
    # exactly the weights' graphs, otherwise building stops with an error.
    _C.MODEL.RWDET.GEN = ""
    # WS(k, p) neighbours k (even); 0 = generator default (4).
    _C.MODEL.RWDET.K = 0
    # ER(p) edge / WS(k, p) rewiring probability; negative = generator default (0.2 / 0.75).
    _C.MODEL.RWDET.P = -1.0
    # BA(m) edges per new node; 0 = generator default (5).
    _C.MODEL.RWDET.M = 0
    # Graph seed; stage i uses rwdet.graphs.stage_seed(SEED, i). Negative = weights / default.
    _C.MODEL.RWDET.SEED = -1
    # Width C (RandWire channel count); 0 = weights / model default (78, 109 or 154).
    _C.MODEL.RWDET.CHANNELS = 0
    # Nodes N per stage; 0 = weights / model default (32).
    _C.MODEL.RWDET.NODES = 0
    # Wiring mode: "static" (RandWire), "dnw", "popup"; empty = weights / model default.
    _C.MODEL.RWDET.WIRING = ""
    # Node operation ("sepconv", "conv", "maxpool", "avgpool"); empty = weights / default.
    _C.MODEL.RWDET.NODE_OP = ""
    # JSON graph artifact (rwdet.graphs.save_graphs) to build the stages from. Must equal the
    # weights' embedded graphs when both are given. Empty: weights' graphs, else GEN/SEED.
    _C.MODEL.RWDET.GRAPH_FILE = ""
    # Accept MODEL.WEIGHTS of a model with random graphs (RandWire) that record no verifiable
    # graphs: no edge lists, or edge lists without their fingerprint (a file edited or written
    # by hand; tools/convert_cls_to_d2.py always records both). False: such weights are refused,
    # since tensors trained on other graphs would load without a word. True: the stages use the
    # file's unverified edge lists, or without any the graphs generated from GEN/SEED.
    _C.MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS = False
    # Stem: "imagenet" (stage strides 2..32, what FPN needs) or "small" (the 28-32 px stem,
    # strides 1..8). Empty: the weights' spec (the converter already sets "imagenet").
    _C.MODEL.RWDET.STEM = ""
    # Norm layer of the whole backbone: "FrozenBN" (fine-tuning default, as Detectron), "BN",
    # "SyncBN" (multi-GPU) or "GN" (32 groups; channel counts must be multiples of 32).
    _C.MODEL.RWDET.NORM = "FrozenBN"
    # How the graph stages run a training step (rwdet.nn.execution): "auto" (the fused op,
    # one saved tensor per node, where a stage allows it — FrozenBN and BN sepconv stages do —
    # else node by node), "reference" (node by node, plain autograd), "recompute" (each node
    # checkpointed), "fused" (refused for a stage that cannot run it) or "rebuild" (the fused
    # op keeping only the stage input; see REBUILD_STAGES). Same results each way.
    _C.MODEL.RWDET.EXECUTION = "auto"
    # Graph stages (by name, e.g. ["conv3", "conv4"]) that keep nothing between forward and
    # backward and rerun their forward in backward (execution "rebuild"): the saved tensors of
    # the stages no longer add up at the end of the forward, for one more forward of each
    # named stage (docs/performance.md measures it). The named stages run "rebuild" whatever
    # EXECUTION says; EXECUTION applies to the others. Empty: EXECUTION for every stage.
    _C.MODEL.RWDET.REBUILD_STAGES = []
    # Edge drop probability while fine-tuning (RandWire regular-regime regulariser). The paper
    # does not say it is used for detection; 0 disables it.
    _C.MODEL.RWDET.EDGE_DROP = 0.0
    # Stage outputs the backbone returns (and FPN may read). RandWire names them conv1..conv5
    # with strides 2, 4, 8, 16, 32.
    _C.MODEL.RWDET.OUT_FEATURES = ["conv2", "conv3", "conv4", "conv5"]
    # Further build_model keyword arguments as a YAML mapping in a config file, e.g.
    #   EXTRA_KWARGS: {wiring_options: {keep: 0.3}, head_channels: 256}
    # (yacs cannot add new keys from the command line; put them in a YAML file). Empty: none.
    _C.MODEL.RWDET.EXTRA_KWARGS = CN(new_allowed=True)
