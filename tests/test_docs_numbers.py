"""The docs' deterministic tables are the code's output (tools/docs_numbers.py, doc_tables).

A table in README.md or docs/*.md that drifts from the code (a changed generator, counting rule
or model) fails here. The cheap rows are regenerated in full; the expensive ones (C=109/C=154
over five seeds, the popup ResNets) are left to ``make docs-numbers``, which checks every block.
"""

import importlib.util
import os

import pytest

from rwdet.analysis import doc_tables as dt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "docs_numbers", os.path.join(ROOT, "tools", "docs_numbers.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dn = _load()


@pytest.fixture(scope="module")
def blocks():
    return {name: text for name, (_path, text) in dn.doc_blocks().items()}


def rows_of(table: str) -> set[str]:
    return {line for line in table.splitlines() if line.startswith("|")}


def test_every_generated_block_is_in_the_docs_once(blocks):
    assert set(blocks) == set(dt.BLOCKS) | set(dn.RENDER)


def test_write_blocks_replaces_only_the_named_block(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "intro 1.0\n<!-- docs_numbers:a -->\nold a\n<!-- /docs_numbers -->\nmiddle 2.0\n"
        "<!-- docs_numbers:b -->\nold b\n<!-- /docs_numbers -->\nend\n"
    )
    assert dn.write_blocks({"a": "new a\n| 1 |\n"}, paths=[str(doc)]) == [
        os.path.relpath(str(doc), ROOT)
    ]
    assert doc.read_text() == (
        "intro 1.0\n<!-- docs_numbers:a -->\nnew a\n| 1 |\n<!-- /docs_numbers -->\nmiddle 2.0\n"
        "<!-- docs_numbers:b -->\nold b\n<!-- /docs_numbers -->\nend\n"
    )
    assert dn.write_blocks({"a": "new a\n| 1 |\n"}, paths=[str(doc)]) == []  # idempotent
    with pytest.raises(ValueError, match="no block \\['c'\\]"):
        dn.write_blocks({"c": "x\n"}, paths=[str(doc)])


# The model counts are memoised in doc_tables, so tests sharing a model pay for it once.


@pytest.mark.parametrize("name", ["graphs", "mobilenet_graphs", "dnw_floor"])
def test_cheap_blocks_match_the_code(blocks, name):
    """Graph statistics of the three generators; MobileNet-DNW budgets and FLOPs floor."""
    assert blocks[name] == dt.static_blocks([name])[name]


@pytest.mark.slow
def test_dnw_table3_matches_the_code(blocks):
    assert blocks["dnw_table3"] == dt.static_blocks(["dnw_table3"])["dnw_table3"]


# Regenerated here in full except these (10-15 s each on 2 cores; `make docs-numbers` checks all).
EXPENSIVE = {"resnet101_popup", "wide_resnet50_popup"}


@pytest.mark.slow
def test_zoo_rows_match_the_code(blocks):
    from rwdet.analysis.tables import zoo_markdown
    from rwdet.models import list_models

    names = [n for n in list_models() if n not in EXPENSIVE]
    expected = rows_of(zoo_markdown([dt.zoo_row(name) for name in names]))
    assert len(expected) == 2 + len(names) and expected <= rows_of(blocks["zoo"]), (
        expected - rows_of(blocks["zoo"])
    )


@pytest.mark.slow
def test_randwire_small_seed_rows_match_the_code(blocks):
    from rwdet.analysis.paper import RANDWIRE
    from rwdet.analysis.tables import to_markdown

    t = dict(dt.seed_table("randwire_small"))
    size, f, fs, p, ps, source = RANDWIRE["randwire_small"]
    t["paper"] = {"flops_m": f, "flops_m_std": fs, "params_m": p, "params_m_std": ps}
    t["source"] = source
    expected = rows_of(to_markdown([t]))
    assert len(expected) == 2 + 7 and expected <= rows_of(blocks["complexity"])


@pytest.mark.slow
def test_readme_model_rows_match_the_code(blocks):
    """All but C=109/C=154, whose five-seed means cost a minute (make docs-numbers)."""
    rows = [r[0] for r in dt.MODEL_ROWS if r[0] not in ("randwire_c109", "randwire_c154")]
    expected = rows_of(dt.block_models(only=rows))
    assert len(expected) == 2 + 8 and expected <= rows_of(blocks["models"])


@pytest.mark.slow
def test_sparse_model_rows_match_the_code(blocks):
    rows = [r for r in dt.SPARSE_ROWS if r[1] not in EXPENSIVE and r[2].get("keep") != 0.2]
    expected = rows_of(dt.block_sparse_models(rows))
    assert len(expected) == 2 + 8 and expected <= rows_of(blocks["sparse_models"])


def test_selection_split_holds_out_the_train_tiles_next_to_val():
    """The transfer recipe is chosen on train tiles only: select is inside train, not val."""
    from detectron2.data import MetadataCatalog

    import rwdet.d2  # noqa: F401  (registers the tree-crown splits)
    from rwdet.d2 import treecrowns as tc

    tiles = tc.plan(tc.deepforest_data_dir())
    train = {t[0] for t in tiles["train"]}
    select = tc.selection_names(tiles["train"])
    assert len(select) == len(tiles["val"]) == 9 and select < train
    val_top = {t[0].split("_x")[0]: t[2][1] for t in tiles["val"]}
    for name, _src, win, _boxes in tiles["train"]:
        if name in select:  # directly above its photo's val band
            assert win[3] == val_top[name.split("_x")[0]]
    for split in ("fit", "select"):
        assert MetadataCatalog.get(f"treecrowns_{split}").image_root.endswith("train")


@pytest.mark.parametrize(
    "transferred, scratch, gain",
    [((7.4, 7.2, 7.0), (6.3, 6.1, 6.2), True), ((7.4, 6.2, 7.0), (6.3, 7.1, 6.2), False)],
)
def test_transfer_gain_is_claimed_only_outside_the_seed_noise(transferred, scratch, gain):
    runs = {}
    for arm, aps in (("transferred", transferred), ("scratch", scratch)):
        for seed, ap in enumerate(aps, start=1):
            runs[f"val_{arm}_seed{seed}"] = {"AP": ap, "AP50": 3 * ap, "AP75": ap / 3}
        runs[f"select_{arm}_bn_lr0.04"] = {"AP": 8.0}
    res = {
        "runs": runs,
        "seeds": [1, 2, 3],
        "chosen": {"transferred": "bn_lr0.04", "scratch": "bn_lr0.04"},
        "provenance": "commit abc, 2026-11-30, 2-core machine",
        "summary": {
            arm: dn.summarize([runs[f"val_{arm}_seed{s}"] for s in (1, 2, 3)])
            for arm in ("transferred", "scratch")
        },
    }
    text = dn.block_transfer(res)
    assert "commit abc, 2026-11-30" in text and "| 3 |" in text
    assert ("Transfer gains" in text) is gain
    assert ("shows no transfer gain" in text) is not gain
