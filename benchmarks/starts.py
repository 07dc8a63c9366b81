"""How well does a label-free rule pick among starts? Trains N starts for E epochs each (as train.restarts does),
scores every start's ACC, modularity on the images' neighbour graph and cluster evenness, and compares picks over
every group of `--group` starts: the highest modularity x evenness (what train.restarts does), each factor alone
(evenness: the rule before), the start that agrees most with the others (mean NMI), and a random one (the mean
ACC), against the best start of each group (labels). `--imbalance R` keeps the classes at 1x..Rx, as quality.py does.

    python benchmarks/starts.py --data ../.data/mnist --config ../configs/mnist.yaml --starts 12 --limit 10000

Prints a table and writes JSON. Not part of the test suite.
"""
from __future__ import annotations

import itertools

import numpy as np
from runner import device, finish, imbalance_arguments, imbalanced, load_arrays, parser
from sklearn.metrics import normalized_mutual_info_score

from clustering import engine, metrics
from clustering.comm import Comm
from clustering.config import PipelineConfig, load_config
from clustering.data.inputs import as_input
from clustering.model.methods import predict_all


def main() -> None:
    p = parser(__doc__, "results/starts.json", config=True)
    p.add_argument("--starts", type=int, default=12, help="starts to train (seeds seed, seed+1000, ...)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per start; default train.restart_epochs")
    p.add_argument("--group", type=int, default=4, help="starts a pick chooses among (train.restarts)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    imbalance_arguments(p)
    args = p.parse_args()

    cfg = load_config(PipelineConfig, args.config, args.set).train
    epochs = args.epochs or cfg.restart_epochs
    images, labels = load_arrays(args.data, args.limit)
    if args.imbalance:
        images, labels = imbalanced(images, labels, args.imbalance, args.draw)
    data = as_input(images, device())  # held once on the device for every start
    x = data.sample
    starts, preds = [], []
    for r in range(args.starts):
        start = engine.start_config(cfg, r)
        _, model = engine.try_start(data, start, epochs, Comm(), x.device)
        preds.append(predict_all(model, x)[0].argmax(1).cpu().numpy())
        starts.append({"seed": start.seed, "acc": metrics.scores(labels, preds[-1])["acc"],
                       "modularity": engine.start_modularity(model, start, x, Comm()),
                       "evenness": engine.cluster_evenness(model, x, Comm(), cfg.k)})
        print(f"  start seed {start.seed}: ACC {starts[-1]['acc']:.4f} modularity {starts[-1]['modularity']:.4f} "
              f"evenness {starts[-1]['evenness']:.4f}", flush=True)
    rows = pick_rows(starts, preds, args.group)
    print(f"\n{len(starts)} starts of {epochs} epochs; picks over every group of {min(args.group, len(starts))}:")
    finish(args.out, {"data": args.data, "n": len(images), "imbalance": args.imbalance, "draw": args.draw,
                      "epochs": epochs, "group": args.group, "config": cfg.model_dump(mode="json"), "starts": starts,
                      "picks": rows},
           (rows, None))


def pick_rows(starts: list[dict], preds: list[np.ndarray], group: int) -> list[dict]:
    """Each rule's mean ACC over every group of `group` starts, and a random pick's (the mean ACC)."""
    n = len(starts)
    agree = np.array([[normalized_mutual_info_score(preds[i], preds[j]) if i != j else np.nan for j in range(n)]
                      for i in range(n)])
    acc = np.array([s["acc"] for s in starts])
    score = [s["modularity"] * s["evenness"] for s in starts]
    rules = {"highest modularity x evenness": lambda g: max(g, key=lambda i: score[i]),
             "highest modularity": lambda g: max(g, key=lambda i: starts[i]["modularity"]),
             "most even clusters": lambda g: max(g, key=lambda i: starts[i]["evenness"]),
             "most agreement (mean NMI)": lambda g: max(g, key=lambda i: np.nanmean(agree[i, [j for j in g if j != i]])),
             "best (labels)": lambda g: max(g, key=lambda i: acc[i])}
    groups = list(itertools.combinations(range(n), min(group, n)))
    rows = [{"pick": name, "mean ACC": f"{np.mean([acc[rule(list(g))] for g in groups]):.4f}"} for name, rule in rules.items()]
    return rows + [{"pick": "random", "mean ACC": f"{acc.mean():.4f}"}]


if __name__ == "__main__":
    main()
