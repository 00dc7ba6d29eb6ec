"""A fitted scikit-learn Isolation Forest as plain tensors, and its ``score_samples`` computed from them in torch.

A checkpoint must load with ``torch.load(weights_only=True)``, so the forest cannot be pickled into it. Every fitted
tree is stored as its node arrays (scikit-learn's ``tree_``: ``children_left``, ``children_right``, ``feature``,
``threshold``, ``n_node_samples``), padded to the largest tree, with the feature subset each tree was grown on and
the forest's ``max_samples_``; :class:`ForestScorer` rebuilds what ``IsolationForest.score_samples`` uses (the depth
of every node, the average path length of the samples left in it) and walks all trees at once. The result equals
``-IsolationForest.score_samples`` to float64 rounding, for finite inputs (tests/test_deep_if.py checks it against
scikit-learn 1.9): Liu et al.'s 2^(-E h(x) / c(max_samples)), where h(x) is the depth of x's leaf in a tree (the root
1) plus c(samples left in that leaf) - 1, E the mean over the trees, c(n) = 2 (ln(n - 1) + γ) - 2 (n - 1) / n,
c(2) = 1, c(n <= 1) = 0. As in scikit-learn, the features are rounded to float32 and compared with the float64
thresholds (``x <= threshold`` goes left).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: scikit-learn's marker of a leaf in ``children_left`` / ``children_right``.
LEAF = -1


def average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n) of Liu et al. for an array of sample counts: the average path length of an unsuccessful binary-search-tree
    search among n samples (0 for n <= 1, 1 for n = 2), float64."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def forest_state(forest) -> dict[str, Any]:
    """The tensors of a fitted :class:`sklearn.ensemble.IsolationForest` (module docstring): ``children_left``,
    ``children_right``, ``feature`` (int64), ``threshold`` (float64), ``n_node_samples`` (int64), each (trees, nodes)
    padded with leaves; ``features`` (trees, features per tree) int64; ``max_samples`` and ``n_features`` (ints)."""
    trees = [estimator.tree_ for estimator in forest.estimators_]
    nodes = max(tree.node_count for tree in trees)

    def stack(attribute: str, fill, dtype) -> torch.Tensor:
        out = np.full((len(trees), nodes), fill, dtype=dtype)
        for i, tree in enumerate(trees):
            out[i, : tree.node_count] = getattr(tree, attribute)[: tree.node_count]
        return torch.from_numpy(out)

    return {"children_left": stack("children_left", LEAF, np.int64),
            "children_right": stack("children_right", LEAF, np.int64),
            "feature": stack("feature", -2, np.int64),
            "threshold": stack("threshold", -2.0, np.float64),
            "n_node_samples": stack("n_node_samples", 0, np.int64),
            "features": torch.from_numpy(np.stack([np.asarray(f, dtype=np.int64) for f in forest.estimators_features_])),
            "max_samples": int(forest.max_samples_), "n_features": int(forest.n_features_in_)}


def node_depths(children_left: np.ndarray, children_right: np.ndarray) -> np.ndarray:
    """(trees, nodes) depth of every node, the root 1 (scikit-learn's ``compute_node_depths``): children always have
    larger ids than their parent in scikit-learn's trees, so one pass in id order suffices."""
    depth = np.zeros(children_left.shape, dtype=np.int64)
    depth[:, 0] = 1
    rows = np.arange(len(depth))
    for node in range(children_left.shape[1]):
        for children in (children_left[:, node], children_right[:, node]):
            inner = children != LEAF
            depth[rows[inner], children[inner]] = depth[inner, node] + 1
    return depth


class ForestScorer:
    """:func:`forest_state`'s forest on ``device``: ``score(features)`` -> ``-score_samples``."""

    def __init__(self, state: dict[str, Any], device: torch.device | str = "cpu"):
        left = state["children_left"].numpy()
        right = state["children_right"].numpy()
        leaf_path = node_depths(left, right) + average_path_length(state["n_node_samples"].numpy()) - 1.0
        self.n_features = int(state["n_features"])
        self.max_samples = int(state["max_samples"])
        self.depth = int(node_depths(left, right).max())
        as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
        self.left = as_tensor(left, torch.int64)
        self.right = as_tensor(right, torch.int64)
        # The column of the input each node tests (the tree's own feature index through its feature subset; leaves: 0).
        feature = state["feature"].numpy().clip(min=0)
        columns = np.take_along_axis(state["features"].numpy(), feature, axis=1)
        self.column = as_tensor(columns, torch.int64)
        self.threshold = as_tensor(state["threshold"], torch.float64)
        self.leaf_path = as_tensor(leaf_path, torch.float64)
        self.denominator = len(left) * float(average_path_length(np.array([self.max_samples]))[0])

    def leaves(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n_features) -> (B, trees) int64: the leaf each sample reaches in each tree."""
        x = features.to(torch.float32).to(torch.float64)
        trees = torch.arange(self.left.shape[0], device=x.device)
        node = torch.zeros(x.shape[0], len(trees), dtype=torch.int64, device=x.device)
        for _ in range(self.depth):
            left = self.left[trees, node]
            inner = left != LEAF
            if not bool(inner.any()):
                break
            value = torch.gather(x, 1, self.column[trees, node])
            step = torch.where(value <= self.threshold[trees, node], left, self.right[trees, node])
            node = torch.where(inner, step, node)
        return node

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(B, n_features) float -> (B,) float64 anomaly scores in (0, 1], equal to ``-score_samples``. ValueError for
        another number of features."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"the forest was fitted on {self.n_features} features, got an array of {tuple(features.shape)}")
        trees = torch.arange(self.left.shape[0], device=features.device)
        depths = self.leaf_path[trees, self.leaves(features)].sum(dim=1)
        if self.denominator == 0:           # a single training sample: scikit-learn scores everything 1
            return torch.ones_like(depths)
        return torch.pow(2.0, -depths / self.denominator)
