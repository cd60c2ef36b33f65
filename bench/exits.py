"""Exit branches on real data: alexnet_cifar with 5 exits trained on scikit-learn's digits (CPU).

Prints the per-exit table (point, MACs, validation and test accuracy), the training time, the
entropy early exit calibrated on validation data for a few accuracy budgets (fraction leaving at
each exit, accuracy and MACs on the test split), and as its last line `final exit accuracy: X`
(test split). Timings on a shared machine are disturbed by other work: read them as such.

    python bench/exits.py [--epochs 15] [--threads 2] [--model alexnet_cifar] [--num-exits 5]
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet_cifar", help="zoo model (default: alexnet_cifar)")
    ap.add_argument("--num-exits", type=int, default=5, help="exits including the final one (default 5)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weights", default=None, help="comma-separated loss weight per exit (default: 1 each)")
    ap.add_argument("--mode", choices=["joint", "heads"], default="joint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="0,0.005,0.01,0.02", help="accuracy losses to calibrate early exit to")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    # OpenMP threads that spin while they wait make a shared CPU several times slower (measured:
    # 1-2.4 s/step spinning vs 0.2-0.5 s/step passive at a load average of 5); set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch  # noqa: E402  (after the environment above)

    import edgecut
    from edgecut import data, zoo
    from edgecut.exits import calibrate_thresholds, early_exit_report, evaluate, train_exits
    from edgecut.frontend import meta as M
    from edgecut.passes import insert_exits

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = zoo.default_input_shape(args.model)
    splits = data.digits(shape, seed=args.seed)
    gm = insert_exits(edgecut.trace(zoo.get(args.model), torch.randn(*shape)), "auto", num_exits=args.num_exits)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    print(f"{args.model} on digits {tuple(shape[1:])}: train/val/test {len(splits.train)}/{len(splits.val)}/"
          f"{len(splits.test)}, {len(gm.meta[M.EXITS])} exits, {args.epochs} epochs, lr {args.lr}, "
          f"{args.mode}, {args.threads} threads")
    t0, c0 = time.perf_counter(), time.process_time()
    val = train_exits(gm, splits.train, splits.val, epochs=args.epochs, lr=args.lr, mode=args.mode,
                      weights=weights, seed=args.seed)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    test = evaluate(gm, splits.test)

    full = gm.meta[M.EXITS][-1]["macs"]
    print(f"\n{'exit':>4}  {'point':<14} {'MACs':>8} {'of final':>8}  {'val acc':>7}  {'test acc':>8}")
    for e, v, t in zip(gm.meta[M.EXITS], val, test):
        print(f"{e['id']:>4}  {e['point']:<14} {e['macs'] / 1e6:>7.2f}M {100 * e['macs'] / full:>7.0f}%  "
              f"{100 * v:>6.2f}%  {100 * t:>7.2f}%")
    print(f"training: {seconds:.1f} s wall ({seconds / max(args.epochs, 1):.2f} s/epoch), {cpu:.1f} s CPU in this "
          f"process; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (others' work slows the wall clock)")

    for budget in (float(b) for b in args.budgets.split(",")):
        calibrate_thresholds(gm, splits.val, budget)
        rep = early_exit_report(gm, splits.test)
        leaves = " ".join(f"{100 * f:.0f}%" for f in rep.fractions)
        print(f"early exit, budget {100 * budget:.1f} points: leaves at exits [{leaves}], test accuracy "
              f"{100 * rep.accuracy:.2f}% (final alone {100 * rep.final_accuracy:.2f}%), "
              f"MACs {100 * rep.macs / rep.full_macs:.0f}% of the backbone")
    print(f"final exit accuracy: {test[-1]:.4f}")
    return test[-1]


if __name__ == "__main__":
    main()
