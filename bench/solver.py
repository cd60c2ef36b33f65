"""bench/solver.py: how fast the solver is, and whether its min cut is the true optimum.

- `solve` on 1,000-node DAGs at 10 Mbit/s (2 ms rtt), and the 64-point plan table (50 kbit/s ..
  1 Gbit/s). Two kinds of DAG: "cnn" (chains, residual blocks and Inception-style blocks with
  2-4 arms, like ResNet/GoogLeNet/MobileNetV2) and "random" (each node reads 1-3 of the previous
  8 nodes: no articulation nodes, so the whole graph is one flow network). Also the zoo's
  resnet18 and mobilenet_v2 (costs from their MACs) for scale. Runs are interleaved and the
  medians reported, because the machine is shared.
- brute force: on random DAGs of 2-12 nodes, the latency of `min_cut` against the best over all
  valid cuts, at several bandwidths and round-trip times.

    python bench/solver.py [--rounds 7] [--dags 300]

The last line is `dag1000_ms=X table64_ms=Y bruteforce_mismatches=Z`, X and Y the worse of the
two 1,000-node DAG kinds.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings

import torch
import torch.fx as fx
from tqdm import tqdm

import edgecut
from edgecut import zoo
from edgecut.errors import DeadlineWarning
from edgecut.frontend import meta
from edgecut.passes import min_cut, plan_table, solve
from edgecut.passes.find_cuts import cut_problem
from edgecut.types import Link

torch.set_num_threads(2)
LINK = Link(10e6, rtt=2e-3)
DEADLINE = 0.2


def _op(*xs):
    return xs[0] if xs else None


def _module(g: fx.Graph, info: dict) -> fx.GraphModule:
    gm = fx.GraphModule(torch.nn.Module(), g)
    for n in gm.graph.nodes:
        if n.op == "output":
            n.meta.update({meta.KIND: meta.OUTPUT, meta.OUT_BYTES: 0})
            continue
        d, e, b = info[n.name]
        # a shape too: only a node with one tensor's shape may be cut after (find_cuts._one_tensor);
        # without it (from 6e911a7 to this fix) no node was a cut, and the bench timed a degenerate
        # problem, one flow network over the whole graph whose only plan was "device"
        n.meta.update({meta.KIND: meta.INPUT if n.op == "placeholder" else meta.OTHER,
                       meta.DEVICE_S: d, meta.EDGE_S: e, meta.OUT_BYTES: int(b), meta.SHAPE: (max(1, int(b) // 4),)})
    return gm


def cnn_dag(n: int, seed: int) -> fx.GraphModule:
    """About n nodes of chains, residual blocks and Inception-style blocks; feature maps shrink."""
    r = random.Random(seed)
    g = fx.Graph()
    cur = g.placeholder("x")
    info, size = {"x": (0.0, 0.0, 3 * 224 * 224 * 4)}, 64 * 112 * 112 * 4

    def op(*args):
        node = g.call_function(_op, args)
        d = r.uniform(2e-4, 5e-3) * (size / 3e6) ** 0.5
        info[node.name] = (d, d / r.uniform(5, 30), size * r.choice([1, 1, 1, 0.5, 2]))
        return node

    while len(info) < n - 1:
        kind = r.choice(["chain", "residual", "residual", "inception"])
        if kind == "chain":
            for _ in range(r.randint(2, 4)):
                cur = op(cur)
        elif kind == "residual":
            y = cur
            for _ in range(r.randint(2, 5)):
                y = op(y)
            cur = op(y, cur)
        else:
            arms = []
            for _ in range(r.randint(2, 4)):
                y = cur
                for _ in range(r.randint(1, 3)):
                    y = op(y)
                arms.append(y)
            cur = op(*arms)
        if r.random() < 0.1:
            size = max(4000, int(size * r.uniform(0.4, 0.8)))
    g.output(op(cur))
    return _module(g, info)


def random_dag(n: int, seed: int, window: int = 8) -> fx.GraphModule:
    """Node i reads 1-3 of the `window` nodes before it; every node feeds a later one."""
    r = random.Random(seed)
    preds = [[]] + [sorted({r.randrange(max(0, i - window), i) for _ in range(r.choice([1, 1, 2, 2, 3]))})
                    for i in range(1, n)]
    for i in range(n - 1):
        if not any(i in p for p in preds):
            j = r.randrange(i + 1, min(n, i + 5))
            preds[j] = sorted(set(preds[j]) | {i})
    g = fx.Graph()
    nodes, info = [g.placeholder("x")], {"x": (0.0, 0.0, r.choice([1e4, 1.5e5, 6e5]))}
    for i in range(1, n):
        nodes.append(g.call_function(_op, tuple(nodes[p] for p in preds[i])))
        d = r.choice([1e-5, 1e-4, 1e-3, 5e-3]) * r.uniform(0.5, 2)
        info[nodes[-1].name] = (d, d / r.choice([0.5, 3, 10, 30]), r.choice([0, 40, 1e3, 1e4, 1e5, 1e6]))
    g.output(nodes[-1])
    return _module(g, info)


def zoo_model(name: str) -> fx.GraphModule:
    gm = edgecut.trace(zoo.get(name), torch.randn(1, 3, 224, 224))
    for n in gm.graph.nodes:  # a Pi-like device (2 GMAC/s) and a 30x faster edge
        macs = n.meta.get(meta.MACS, 0)
        n.meta[meta.DEVICE_S], n.meta[meta.EDGE_S] = 2e-5 + macs / 2e9, 2e-6 + macs / 6e10
    return gm


def timings(graphs: dict, rounds: int) -> dict:
    runs = {name: {"solve": [], "table": []} for name in graphs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeadlineWarning)
        for _ in tqdm(range(rounds), desc="timing rounds", file=sys.stderr):
            for name, gm in graphs.items():  # interleaved: every graph once per round
                t = time.perf_counter()
                solve(gm, LINK, DEADLINE)
                runs[name]["solve"].append(time.perf_counter() - t)
                t = time.perf_counter()
                plan_table(gm, DEADLINE, rtt=LINK.rtt)
                runs[name]["table"].append(time.perf_counter() - t)
    return {name: {k: statistics.median(v) * 1e3 for k, v in r.items()} for name, r in runs.items()}


def brute_force_mismatches(dags: int) -> tuple[int, int]:
    mismatches = checks = 0
    for seed in tqdm(range(dags), desc="brute force", file=sys.stderr):
        r = random.Random(seed)
        gm = random_dag(r.randint(2, 12), seed, window=r.choice([2, 4, 12]))
        p = cut_problem(gm)
        valid = list(p.valid_cuts())
        for bw in (5e4, 1e6, 2e7, 1e9):
            for rtt in (0.0, 5e-3):
                link = Link(bw, rtt=rtt)
                best = min(c.latency(link) for c in valid)
                cut = min_cut(gm, link)
                got = p.cost(i for i, name in enumerate(p.names) if name in cut.device).latency(link)
                checks += 1
                if abs(got - best) > 1e-9 * best + 1e-12:
                    mismatches += 1
                    print(f"mismatch: seed {seed} at {bw:g} bit/s rtt {rtt}: {got} vs {best}")
    return mismatches, checks


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds (medians are reported)")
    ap.add_argument("--dags", type=int, default=300, help="random DAGs checked against brute force")
    ap.add_argument("--no-zoo", action="store_true", help="skip resnet18 and mobilenet_v2")
    args = ap.parse_args(argv)
    graphs = {"cnn1000": cnn_dag(1000, 1), "random1000": random_dag(1000, 1)}
    if not args.no_zoo:
        graphs.update({"resnet18": zoo_model("resnet18"), "mobilenet_v2": zoo_model("mobilenet_v2")})
    res = timings(graphs, args.rounds)
    print(f"{'graph':<14}{'nodes':>7}{'solve ms':>10}{'table64 ms':>12}  plans in the table")
    for name, gm in graphs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeadlineWarning)
            table = plan_table(gm, DEADLINE, rtt=LINK.rtt)
        print(f"{name:<14}{cut_problem(gm).n:>7}{res[name]['solve']:>10.1f}{res[name]['table']:>12.1f}  "
              f"{len(table.plans)}: " + ", ".join(p.cut.name[:24] for p in table.plans))
    mismatches, checks = brute_force_mismatches(args.dags)
    print(f"brute force: {checks} (DAG, bandwidth, rtt) cases on {args.dags} random DAGs of 2-12 nodes")
    worst = {k: max(res[g][k] for g in ("cnn1000", "random1000")) for k in ("solve", "table")}
    print(f"dag1000_ms={worst['solve']:.1f} table64_ms={worst['table']:.1f} bruteforce_mismatches={mismatches}")


if __name__ == "__main__":
    main()
