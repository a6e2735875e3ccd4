#!/usr/bin/env python
"""Regenerate every number that README.md and docs/*.md quote, from this checkout.

    python tools/docs_numbers.py static [--write|--check]  # complexity, zoo, graphs (minutes)
    python tools/docs_numbers.py demo [--write]       # `make demo`: top-1 and AP (minutes)
    python tools/docs_numbers.py transfer [--write]   # transferred vs from scratch (~1 hour)
    python tools/docs_numbers.py demo --no-run --write  # render saved results, run nothing

The docs hold each generated block between ``<!-- docs_numbers:NAME -->`` and
``<!-- /docs_numbers -->``; ``--write`` replaces the blocks in place, otherwise they are printed.
The static blocks (``rwdet.analysis.doc_tables``) are deterministic: ``--check`` (``make
docs-numbers``) compares every one with the docs, ``tests/test_docs_numbers.py`` (``make test``)
all but the costliest rows. The measured blocks come from runs this script starts and state the
commit, date and machine; their raw results stay in ``output/docs_numbers/*.json``, and a
rerun reuses the detector runs already finished there (``--rerun``: start afresh).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rwdet.analysis.doc_tables import static_blocks  # noqa: E402
from rwdet.atomic import atomic_write  # noqa: E402
from rwdet.run.errors import UserError, run_cli  # noqa: E402

PROG = "docs_numbers.py"
OUT = os.path.join("output", "docs_numbers")
BLOCK = re.compile(r"<!-- docs_numbers:(\w+) -->\n(.*?)<!-- /docs_numbers -->", re.S)
DEMO_CONFIG = os.path.join("configs", "frcnn_randwire_demo.yaml")


def cls_run() -> str:
    """The folder `make demo-cls` (``tools/train_cls.py --gen ws``) trains in."""
    from classification.config import resolve

    return resolve(None, {"model": {"gen": "ws"}})["output_dir"]


# ---------------------------------------------------------------- blocks in the docs files


def doc_files() -> list[str]:
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md")
    )


def doc_blocks(paths=None) -> dict[str, tuple[str, str]]:
    """{block name: (file, current text)} over ``paths`` (README.md and docs/*.md)."""
    found = {}
    for path in paths or doc_files():
        with open(path, encoding="utf-8") as f:
            for m in BLOCK.finditer(f.read()):
                if m.group(1) in found:
                    raise UserError(f"block {m.group(1)!r} appears twice ({path})")
                found[m.group(1)] = (path, m.group(2))
    return found


def write_blocks(new: dict[str, str], paths=None) -> list[str]:
    """Replace the named blocks' text wherever they are; returns the files changed."""
    where = doc_blocks(paths)
    missing = sorted(set(new) - set(where))
    if missing:
        raise UserError(f"no block {missing} in README.md or docs/*.md; add its markers first")

    def sub(m):
        body = new.get(m.group(1), m.group(2))
        return f"<!-- docs_numbers:{m.group(1)} -->\n{body}<!-- /docs_numbers -->"

    changed = []
    for path in sorted({where[name][0] for name in new}):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        updated = BLOCK.sub(sub, text)
        if updated != text:
            atomic_write(path, lambda f, t=updated: f.write(t), mode="w")
            changed.append(os.path.relpath(path, ROOT))
    return changed


def provenance() -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cores = os.cpu_count()
    local = " + local changes" if dirty else ""
    return f"commit {commit or 'unknown'}{local}, {date}, {cores}-core machine"


# ---------------------------------------------------------------- slow part: training runs


def python() -> str:
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def run_logged(cmd: list[str], log: str, env: dict | None = None) -> str:
    """Run ``cmd`` from the repository root, its output in ``log``; returns that output."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        rc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**full_env, **(env or {})}
        ).returncode
    with open(log) as f:
        out = f.read()
    if rc != 0:
        raise UserError(f"{' '.join(cmd[:3])} ... failed with exit code {rc}; see {log}")
    return out


def parse_ap(out: str, dataset: str) -> dict:
    m = re.findall(rf"\[rwdet\] {dataset} bbox: AP (\S+)  AP50 (\S+)  AP75 (\S+)", out)
    if not m:
        raise UserError(f"no '[rwdet] {dataset} bbox' line in the run's output")
    ap, ap50, ap75 = (float(x) for x in m[-1])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def parse_top1(out: str) -> dict:
    m = re.findall(r"final top-1: (\S+)%  top-5: (\S+)%", out)
    if not m:
        raise UserError("no 'final top-1' line in the classification demo's output")
    return {"top1": float(m[-1][0]), "top5": float(m[-1][1])}


def run_demo(args) -> dict:
    """`make demo` as it is: the classification demo (resumed if finished), then demo_det.sh."""
    res = {"provenance": provenance()}
    os.makedirs(OUT, exist_ok=True)
    log = os.path.join(OUT, "demo_cls.txt")
    cls = [python(), "tools/train_cls.py", "--gen", "ws"] + (["--no-resume"] if args.rerun else [])
    res["cls"] = parse_top1(run_logged(cls, log))
    out = run_logged(["bash", "tools/demo_det.sh"], os.path.join(OUT, "demo_det.txt"))
    res["det"] = parse_ap(out, "treecrowns_val")
    secs = re.findall(r"demo_det: done in (\d+) s", out)
    res["det"]["seconds"] = int(secs[-1]) if secs else None
    atomic_write(os.path.join(OUT, "demo.json"), lambda f: json.dump(res, f, indent=1), "w")
    return res


# The LR/BN recipes compared for each arm; the choice is made on treecrowns_select (train tiles
# held out of treecrowns_fit), never on the 9 val tiles that report the AP. FrozenBN with the
# stem frozen (the COCO setting) is a candidate only for transferred weights: a random backbone
# with frozen identity statistics and a frozen random stem is no recipe anyone would pick.
NORM = {
    "frozenbn": ["MODEL.RWDET.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2"],
    "bn": ["MODEL.RWDET.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"],
}
RECIPES = {
    f"{norm}_lr{lr}": NORM[norm] + ["SOLVER.BASE_LR", lr]
    for norm, lr in (("bn", "0.02"), ("bn", "0.04"), ("frozenbn", "0.02"))
}
SCRATCH = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.RWDET.NAME",
    "randwire_small",
    "MODEL.RWDET.CHANNELS",
    "16",
    "MODEL.RWDET.NODES",
    "8",
    "MODEL.RWDET.GEN",
    "ws",
    "MODEL.RWDET.SEED",
    "1",
]
SELECT_SEED = 0
DIVERGED = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "diverged": True}


def demo_weights() -> str:
    """The classification demo's checkpoint converted as demo_det.sh does (own copy)."""
    run = cls_run()
    ckpt = next(
        (
            os.path.join(run, f)
            for f in ("best.pth", "last.pth")
            if os.path.exists(os.path.join(ROOT, run, f))
        ),
        None,
    )
    if ckpt is None:
        raise UserError(f"no classification demo checkpoint in {run}; run make demo-cls first")
    out = os.path.join(OUT, "demo_randwire_small.pkl")
    run_logged(
        [python(), "tools/convert_cls_to_d2.py", ckpt, out, "--overwrite"],
        os.path.join(OUT, "convert.txt"),
    )
    return out


def det_runs(todo: list[tuple[str, list[str], str]], results: dict, path: str, args):
    """Run the (name, overrides, test set) not yet in ``results``, ``args.jobs`` at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def one(item):
        name, overrides, test = item
        r = det_run(name, overrides, test, reuse=not args.rerun)
        with lock:
            results["runs"][name] = r
            atomic_write(path, lambda f: json.dump(results, f, indent=1), "w")

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, [t for t in todo if t[0] not in results["runs"]]))


def det_run(name: str, overrides: list[str], test: str, reuse: bool = True) -> dict:
    """One fine-tune; a finished run's console log is reused, a diverged run scores 0."""
    out_dir = os.path.join(OUT, "runs", name)
    log = out_dir + ".console.txt"
    if reuse and os.path.exists(log):
        with open(log) as f:
            done = f.read()
        if f"[rwdet] {test} bbox" in done and os.path.exists(f"{out_dir}/model_final.pth"):
            return {**parse_ap(done, test), "overrides": overrides}
        if "Training has diverged" in done:
            return {**DIVERGED, "overrides": overrides}
    cmd = [
        python(),
        "tools/train_net.py",
        "--config-file",
        DEMO_CONFIG,
        "--no-auto-resume",
        "OUTPUT_DIR",
        out_dir,
    ] + overrides
    print(f"{PROG}: {name} ...", flush=True)
    try:
        r = parse_ap(run_logged(cmd, log), test)
    except UserError:
        with open(log) as f:
            if "Training has diverged" not in f.read():
                raise
        r = dict(DIVERGED)
    r["overrides"] = overrides
    print(f"{PROG}: {name}: AP {r['AP']:.2f}  AP50 {r['AP50']:.2f}", flush=True)
    return r


def run_transfer(args) -> dict:
    path = os.path.join(ROOT, OUT, "transfer.json")
    results = {"runs": {}}
    if os.path.exists(path) and not args.rerun:
        with open(path) as f:
            results = json.load(f)
    results["provenance"] = provenance()
    arms = {"transferred": ["MODEL.WEIGHTS", demo_weights()], "scratch": SCRATCH}
    fit = ["DATASETS.TRAIN", "('treecrowns_fit',)", "DATASETS.TEST", "('treecrowns_select',)"]
    det_runs(
        [
            (
                f"select_{arm}_{recipe}",
                base + ov + fit + ["SEED", str(SELECT_SEED)],
                "treecrowns_select",
            )
            for arm, base in reversed(arms.items())
            for recipe, ov in RECIPES.items()
            if arm == "transferred" or not recipe.startswith("frozenbn")
        ],
        results,
        path,
        args,
    )
    chosen = {
        arm: max(
            (r for r in RECIPES if f"select_{arm}_{r}" in results["runs"]),
            key=lambda r, a=arm: results["runs"][f"select_{a}_{r}"]["AP"],
        )
        for arm in arms
    }
    results["chosen"] = chosen
    det_runs(
        [
            (
                f"val_{arm}_seed{seed}",
                base + RECIPES[chosen[arm]] + ["SEED", str(seed)],
                "treecrowns_val",
            )
            for seed in args.seeds
            for arm, base in arms.items()
        ],
        results,
        path,
        args,
    )
    results["seeds"] = args.seeds
    results["summary"] = {
        arm: summarize([results["runs"][f"val_{arm}_seed{s}"] for s in args.seeds]) for arm in arms
    }
    atomic_write(path, lambda f: json.dump(results, f, indent=1), "w")
    return results


def summarize(runs: list[dict]) -> dict:
    out = {"n": len(runs)}
    for k in ("AP", "AP50", "AP75"):
        v = [r[k] for r in runs]
        out[k] = statistics.mean(v)
        out[k + "_std"] = statistics.stdev(v) if len(v) > 1 else 0.0
    return out


# ---------------------------------------------------------------- measured blocks


def load_result(name: str) -> dict:
    path = os.path.join(ROOT, OUT, name + ".json")
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; run `python tools/docs_numbers.py {name}` first")
    with open(path) as f:
        return json.load(f)


def block_demo_cls(res: dict) -> str:
    c = res["cls"]
    return (
        f"Measured with `make demo-cls` ({res['provenance']}): **top-1 {c['top1']:.2f}%** "
        f"(top-5 {c['top5']:.2f}%) on the 10k test images.\n"
    )


def block_demo_det(res: dict) -> str:
    c, d = res["cls"], res["det"]
    secs = d.get("seconds")
    secs = f" in {secs // 60} min {secs % 60} s of wall time (it varies with load)" if secs else ""
    return (
        f"Measured with `bash tools/demo_det.sh` ({res['provenance']}), starting from the "
        f"classification demo's checkpoint ({c['top1']:.2f}% top-1): conversion, 300 iterations "
        f"at 4 tiles per step and evaluation{secs}, giving **AP {d['AP']:.2f}, AP50 "
        f"{d['AP50']:.2f}** (AP75 {d['AP75']:.2f}) on the 9 held-out val tiles (detectron2 "
        "`SEED 0`; a single run: the seed-to-seed spread is in the transfer table below).\n"
    )


def pm(summary: dict, key: str) -> str:
    return f"{summary[key]:.2f} ± {summary[key + '_std']:.2f}"


# Student's t, two-sided 95%, by degrees of freedom (n1 + n2 - 2): small n needs a wide margin.
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 10: 2.23}


def block_transfer(res: dict) -> str:
    runs, chosen, summ = res["runs"], res["chosen"], res["summary"]

    def scores(arm):
        out = []
        for recipe in RECIPES:
            r = runs.get(f"select_{arm}_{recipe}")
            if r is not None:
                ap = "diverged" if r.get("diverged") else f"{r['AP']:.2f}"
                out.append(f"{recipe} {ap}")
        return ", ".join(out)

    seeds = res.get("seeds") or sorted(  # results of an older version lack "seeds"
        int(k.rsplit("seed", 1)[1]) for k in runs if k.startswith("val_transferred_seed")
    )
    lines = [
        f"Transferred vs from scratch, measured with `python tools/docs_numbers.py transfer` "
        f"({res['provenance']}). Each arm's LR/BatchNorm recipe was chosen on "
        "`treecrowns_select` (9 train tiles, trained on the other 29, `SEED 0`), never on the "
        "val tiles; then each arm was trained on all 38 train tiles with detectron2 "
        f"`SEED` {', '.join(map(str, seeds))} and evaluated on the 9 val tiles (mean ± sample "
        "std over the seeds):",
        "",
        "| arm | recipe chosen (AP on select) | n | AP | AP50 | AP75 |",
        "|---|---|---|---|---|---|",
    ]
    names = {"transferred": "transferred (demo checkpoint)", "scratch": "from scratch"}
    for arm in ("transferred", "scratch"):
        s = summ[arm]
        lines.append(
            f"| {names[arm]} | **{chosen[arm]}** ({scores(arm)}) | {s['n']} | {pm(s, 'AP')} | "
            f"{pm(s, 'AP50')} | {pm(s, 'AP75')} |"
        )
    t, f = summ["transferred"], summ["scratch"]
    diff = t["AP"] - f["AP"]
    se = (t["AP_std"] ** 2 / t["n"] + f["AP_std"] ** 2 / f["n"]) ** 0.5
    crit = T_975.get(t["n"] + f["n"] - 2, 2.0)
    tval = diff / se if se > 0 else float("inf") if diff else 0.0
    if tval > crit:
        verdict = (
            f"Transfer gains {diff:+.2f} AP over training from scratch (t = {tval:.1f} against "
            f"the two-sided 95% threshold {crit} at n = {t['n']} + {f['n']})."
        )
    else:
        verdict = (
            f"The difference, {diff:+.2f} AP (t = {tval:.1f}; the two-sided 95% threshold at "
            f"n = {t['n']} + {f['n']} is {crit}), is within the seed-to-seed noise: this data "
            "shows no transfer gain."
        )
    lines += ["", verdict]
    return "\n".join(lines) + "\n"


MEASURED = {"demo": ("demo_cls", "demo_det"), "transfer": ("transfer",)}
RENDER = {"demo_cls": block_demo_cls, "demo_det": block_demo_det, "transfer": block_transfer}


def measured_blocks(what: str, res: dict) -> dict[str, str]:
    return {name: RENDER[name](res) for name in MEASURED[what]}


def check(blocks: dict[str, str]) -> list[str]:
    """Names of the blocks whose text in the docs differs from ``blocks``."""
    where = doc_blocks()
    return [n for n, text in blocks.items() if n not in where or where[n][1] != text]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("what", choices=["static", "demo", "transfer", "all"])
    parser.add_argument("--write", action="store_true", help="rewrite the blocks in the docs")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a block in the docs differs (static)"
    )
    parser.add_argument(
        "--no-run", action="store_true", help="render demo/transfer from the saved results"
    )
    parser.add_argument("--rerun", action="store_true", help="ignore finished runs in " + OUT)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="detectron2 SEEDs of the transfer comparison (default 1 2 3)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="detector runs at once (1 thread each)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} is out of range; use 1 or more")
    os.chdir(ROOT)
    blocks = {}
    if args.what in ("static", "all"):
        blocks.update(static_blocks())
    for what, run in (("demo", run_demo), ("transfer", run_transfer)):
        if args.what in (what, "all"):
            res = load_result(what) if args.no_run else run(args)
            blocks.update(measured_blocks(what, res))
    if args.check:
        stale = check(blocks)
        if stale:
            print(f"{PROG}: out of date in the docs: {', '.join(stale)} (rerun with --write)")
            return 1
        print(f"{PROG}: {len(blocks)} blocks match the code")
        return 0
    if args.write:
        changed = write_blocks(blocks)
        print(f"{PROG}: wrote {', '.join(changed) or 'nothing (all up to date)'}")
        return 0
    for name, text in blocks.items():
        print(f"<!-- docs_numbers:{name} -->\n{text}<!-- /docs_numbers -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
