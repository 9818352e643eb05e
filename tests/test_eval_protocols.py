"""UNI's frozen-feature protocols against references written here from mahmoodlab/UNI's
``uni/downstream/eval_patch_features`` code: metrics (``get_eval_metrics``, i.e.
scikit-learn), the torch L-BFGS logistic regression, kNN (CL2N + scikit-learn's
``KNeighborsClassifier``), SimpleShot (ProtoNet), the few-shot episode sampler and
per-episode loop, and ROI retrieval; plus the paired bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    cohen_kappa_score,
    roc_auc_score,
)
from sklearn.neighbors import KNeighborsClassifier

from histoscope.eval import (
    bootstrap_samples,
    confusion_matrices,
    confusion_scores,
    evaluate,
    fewshot,
    knn_probe,
    linear_probe,
    ovo_auroc,
    paired_bootstrap,
    probe_metrics,
    quadratic_weighted_kappa,
    retrieval,
    simpleshot,
)
from histoscope.eval.episodes import sample_episodes
from histoscope.eval.probes import fit_logistic_regression
from histoscope.eval.tiles import TileEvalSettings, evaluate_tiles


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(seed: int, n_train: int = 240, n_test: int = 150, classes: int = 4, dim: int = 24,
              spread: float = 1.0, offset: float = 3.0):
    """Gaussian classes around random centres, sharing a large offset (as real embeddings do)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 0.6
    def draw(n):
        y = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
        return (centres[y] + spread * rng.normal(size=(n, dim)) + offset).astype(np.float32), y
    return (*draw(n_train), *draw(n_test))


# --- reference: uni/downstream/eval_patch_features/metrics.py::get_eval_metrics -------------------

def _uni_metrics(targets, preds, probs=None, roc_kwargs=None):
    report = classification_report(targets, preds, output_dict=True, zero_division=0)
    metrics = {"acc": accuracy_score(targets, preds), "bacc": balanced_accuracy_score(targets, preds),
               "kappa": cohen_kappa_score(targets, preds, weights="quadratic"),
               "weighted_f1": report["weighted avg"]["f1-score"]}
    if probs is not None:
        metrics["auroc"] = roc_auc_score(targets, probs, **(roc_kwargs or {}))
    return metrics


def _assert_metrics(ours, reference, tol=1e-12):
    assert set(ours) == set(reference)
    for name in reference:
        assert ours[name] == pytest.approx(float(reference[name]), abs=tol), name


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(8))
def test_probe_metrics_equal_uni_get_eval_metrics(seed):
    rng = np.random.default_rng(seed)
    classes = 5
    y = rng.integers(0, classes, 80)
    pred = np.where(rng.uniform(size=80) < 0.6, y, rng.integers(0, classes, 80))
    if seed % 2:  # a class nobody predicts, and one predicted but absent from the truth
        pred[pred == 2] = 3
        y[y == 4] = 0
    probs = rng.dirichlet(np.ones(classes), size=80)
    probs[np.arange(80), pred] += 1
    probs /= probs.sum(1, keepdims=True)
    reference = _uni_metrics(y, pred)
    _assert_metrics(probe_metrics(y, pred), reference)
    if len(np.unique(y)) == classes:  # scikit-learn's ovo needs every column's class present
        _assert_metrics(probe_metrics(y, pred, probs),
                        _uni_metrics(y, pred, probs, {"multi_class": "ovo", "average": "macro"}))


def test_ovo_auroc_hand_value_with_a_class_absent():
    # Class 1 never occurs: only the pair (0, 2) counts. Column 0 ranks 3 of the 4 (class 0,
    # class 2) pairs right, column 2 all 4 of the (class 2, class 0) pairs: (3/4 + 1) / 2.
    y = np.array([0, 0, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.5, 0.2, 0.3], [0.2, 0.1, 0.7]])
    assert ovo_auroc(y, probs) == pytest.approx(0.875)


def test_binary_auroc_is_the_positive_column():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    probs = rng.dirichlet([1, 1], size=60)
    pred = probs.argmax(1)
    _assert_metrics(probe_metrics(y, pred, probs), _uni_metrics(y, pred, probs[:, 1]))


def test_tile_kappa_uses_positions_of_the_labels_seen():
    # Classes 0, 2, 3 occur; 1 never does. UNI's (scikit-learn's) kappa measures distances
    # between positions 0, 1, 2 of the labels seen; the slide-level QWK between grades 0 … 3.
    y = np.array([0, 0, 2, 2, 3, 3, 3, 0])
    pred = np.array([0, 2, 2, 3, 3, 0, 3, 0])
    assert probe_metrics(y, pred)["kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert quadratic_weighted_kappa(y, pred, 4) == pytest.approx(
        cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2, 3]))
    assert probe_metrics(y, pred)["kappa"] != pytest.approx(quadratic_weighted_kappa(y, pred, 4))


def test_confusion_scores_batch_equals_one_at_a_time():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, (30, 50))
    pred = np.where(rng.uniform(size=(30, 50)) < 0.5, y, rng.integers(0, 4, (30, 50)))
    batch = confusion_scores(confusion_matrices(y, pred, 4))
    for e in range(30):
        _assert_metrics({k: v[e] for k, v in batch.items()}, _uni_metrics(y[e], pred[e]))
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrices([0, 4], [0, 1], 4)


# --- reference: logistic_regression.py::LogisticRegression + linear_probe.py -------------------------

class _UniLogisticRegression:
    """UNI's class, device fixed to the CPU."""

    def __init__(self, C, max_iter):
        self.C, self.max_iter = C, max_iter
        self.loss_func = torch.nn.CrossEntropyLoss()

    def compute_loss(self, feats, labels):
        loss = self.loss_func(feats, labels)
        wreg = 0.5 * self.logreg.weight.norm(p=2)
        return loss.mean() + (1.0 / self.C) * wreg

    def predict_proba(self, feats):
        return self.logreg(feats).softmax(dim=-1)

    def fit(self, feats, labels):
        self.logreg = torch.nn.Linear(feats.shape[1], len(torch.unique(labels)), bias=True).to(feats.dtype)
        self.logreg.weight.data.fill_(0.0)
        self.logreg.bias.data.fill_(0.0)
        opt = torch.optim.LBFGS(self.logreg.parameters(), line_search_fn="strong_wolfe", max_iter=self.max_iter)

        def loss_closure():
            opt.zero_grad()
            loss = self.compute_loss(self.logreg(feats), labels)
            loss.backward()
            return loss

        opt.step(loss_closure)


def _uni_linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, max_iter):
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    num_c = len(set(train_y.numpy()))
    cost = train_x.shape[1] * num_c / 100
    if val_x is not None:
        train_x = torch.cat([train_x, torch.as_tensor(val_x)])
        train_y = torch.cat([train_y, torch.as_tensor(val_y)])
    classifier = _UniLogisticRegression(cost, max_iter)
    classifier.fit(train_x, train_y)
    with torch.no_grad():
        probs = classifier.predict_proba(test_x)
    if len(set(test_y.numpy())) == 2:
        scores, roc_kwargs = probs[:, 1].numpy(), {}
    else:
        scores, roc_kwargs = probs.numpy(), {"multi_class": "ovo", "average": "macro"}
    preds = probs.argmax(dim=1).numpy()
    return classifier.logreg, preds, probs.numpy(), _uni_metrics(test_y.numpy(), preds, scores, roc_kwargs)


@pytest.mark.parametrize("classes,with_val", [(4, False), (4, True), (2, False)])
def test_linear_probe_equals_uni(classes, with_val):
    train_x, train_y, test_x, test_y = _features(classes, classes=classes, spread=1.6)
    val_x, val_y = (train_x[:60], train_y[:60]) if with_val else (None, None)
    if with_val:
        train_x, train_y = train_x[60:], train_y[60:]
    ref_linear, ref_preds, ref_probs, ref_metrics = _uni_linear_probe(train_x, train_y, val_x, val_y, test_x,
                                                                      test_y, max_iter=100)
    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, max_iter=100)
    np.testing.assert_array_equal(result.preds, ref_preds)
    np.testing.assert_allclose(result.probs, ref_probs, atol=1e-6)
    _assert_metrics(result.metrics, ref_metrics, tol=1e-6)
    assert 0.5 < result.metrics["bacc"] < 1  # a real task: better than chance, not trivial


def test_linear_probe_weights_equal_uni_and_reach_the_optimum():
    train_x, train_y, _, _ = _features(3, n_train=120)
    x, y = torch.as_tensor(train_x, dtype=torch.float64), torch.as_tensor(train_y)
    cost = x.shape[1] * 4 / 100
    reference = _UniLogisticRegression(cost, 1000)
    reference.fit(x, y)
    ours = fit_logistic_regression(x, y, num_classes=4, cost=cost, max_iter=1000)
    torch.testing.assert_close(ours.weight, reference.logreg.weight.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(ours.bias, reference.logreg.bias.detach(), atol=1e-10, rtol=0)
    # Stationary point of CE + (1/cost)·½‖W‖: the gradient shrinks 10⁴-fold from the start.
    def largest_gradient(weight, bias):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        objective = F.cross_entropy(x @ w.T + b, y) + (1 / cost) * 0.5 * w.norm()
        return max(g.abs().max().item() for g in torch.autograd.grad(objective, (w, b)))

    start = largest_gradient(torch.zeros_like(ours.weight), torch.zeros_like(ours.bias))
    assert largest_gradient(ours.weight, ours.bias) < 1e-4 * start
    assert ours.weight.norm() > 0.1  # the penalty did not collapse the solution to zero


def test_linear_probe_keeps_caller_labels_and_runs_under_no_grad():
    train_x, train_y, test_x, test_y = _features(5, classes=3)
    names = np.array(["stroma", "tumour", "normal"])
    with torch.no_grad():
        result = linear_probe(torch.as_tensor(train_x), names[train_y], test_x, names[test_y], max_iter=30)
    assert list(result.classes) == ["normal", "stroma", "tumour"]
    assert set(result.preds) <= set(names) and result.probs.shape == (len(test_y), 3)
    np.testing.assert_array_equal(result.preds, result.classes[result.probs.argmax(1)])
    with pytest.raises(ValueError, match="not among the training labels"):
        linear_probe(train_x, train_y, test_x, test_y + 7, max_iter=5)


# --- reference: fewshot.py::eval_knn (kNN and prototypes) -------------------------------------------

def _uni_eval_knn(train_x, train_y, test_x, test_y, n_neighbors=20):
    feats_source, feats_query = torch.as_tensor(train_x), torch.as_tensor(test_x)
    labels_source = np.asarray(train_y)
    feats_mean = feats_source.mean(dim=0, keepdims=True)
    feats_query = feats_query - feats_mean
    feats_source = feats_source - feats_mean
    feats_source = F.normalize(feats_source, dim=-1, p=2)
    feats_query = F.normalize(feats_query, dim=-1, p=2)
    feats_proto = torch.vstack([feats_source[np.where(labels_source == c)[0]].mean(dim=0)
                                for c in sorted(np.unique(labels_source))])
    labels_proto = torch.Tensor(sorted(np.unique(labels_source)))
    pw_dist = (feats_query[:, None] - feats_proto[None, :]).norm(dim=-1, p=2)
    proto_preds = labels_proto[pw_dist.min(dim=1).indices].numpy().astype(np.int64)
    knn = KNeighborsClassifier(n_neighbors=n_neighbors)
    knn_preds = knn.fit(feats_source.numpy(), labels_source).predict(feats_query.numpy())
    return knn_preds, proto_preds


@pytest.mark.parametrize("seed", range(3))
def test_knn_and_simpleshot_equal_uni_eval_knn(seed):
    train_x, train_y, test_x, test_y = _features(10 + seed, spread=2.0)
    knn_ref, proto_ref = _uni_eval_knn(train_x, train_y, test_x, test_y)
    knn = knn_probe(train_x, train_y, test_x, test_y, k=20)
    proto = simpleshot(train_x, train_y, test_x, test_y)
    np.testing.assert_array_equal(knn.preds, knn_ref)
    np.testing.assert_array_equal(proto.preds, proto_ref)
    _assert_metrics(knn.metrics, _uni_metrics(test_y, knn_ref))
    _assert_metrics(proto.metrics, _uni_metrics(test_y, proto_ref))
    assert knn.probs is None and proto.probs is None and "auroc" not in knn.metrics
    assert 0.4 < knn.metrics["acc"] < 1 and (knn.preds != proto.preds).any()  # two different rules


def test_knn_tied_vote_goes_to_the_smallest_class_like_scikit_learn():
    # The two training points nearest every query carry different classes: a 1–1 vote.
    train_x = np.array([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.0], [-1.0, 0.05]], dtype=np.float32)
    train_y = np.array([2, 1, 0, 0])
    test_x = np.array([[1.0, 0.0], [0.9, 0.0]], dtype=np.float32)
    ours = knn_probe(train_x, train_y, test_x, np.array([1, 2]), k=2, center=False)
    reference = KNeighborsClassifier(n_neighbors=2).fit(
        F.normalize(torch.as_tensor(train_x), dim=-1).numpy(), train_y).predict(
        F.normalize(torch.as_tensor(test_x), dim=-1).numpy())
    np.testing.assert_array_equal(ours.preds, [1, 1])
    np.testing.assert_array_equal(ours.preds, reference)


# --- reference: fewshot.py::FewShotEpisodeSampler and eval_fewshot's loop ----------------------------

def _uni_sampler(train_labels, test_labels, n_iter, n_way, n_shot):
    train_labels = np.array(train_labels)
    train_ind, test_ind = [], []
    for i in np.sort(np.unique(train_labels)):
        train_ind.append(np.argwhere(train_labels == i).reshape(-1))
        test_ind.append(np.argwhere(test_labels == i).reshape(-1))
    for _ in range(n_iter):
        batch_gallery = []
        classes = torch.randperm(len(train_ind))[:n_way]
        for c in classes:
            train_c = train_ind[c.item()]
            train_pos = torch.multinomial(torch.ones(len(train_c)), n_shot)
            batch_gallery.append(train_c[train_pos])
        yield np.concatenate(batch_gallery) if n_shot > 1 else np.array(batch_gallery).reshape(-1)


def _uni_fewshot_loop(train_x, train_y, test_x, test_y, episodes, n_way, n_shot):
    train_x, test_x = torch.as_tensor(train_x), torch.as_tensor(test_x)
    train_y = torch.as_tensor(train_y)
    rows = []
    for source in episodes:
        feats_source, labels_source = train_x[source], train_y[source]
        feats_query, labels_query = test_x.clone(), np.asarray(test_y)
        feats_mean = feats_source.mean(dim=0, keepdims=True)
        feats_query = feats_query - feats_mean
        feats_source = feats_source - feats_mean
        feats_source = F.normalize(feats_source, dim=-1, p=2)
        feats_query = F.normalize(feats_query, dim=-1, p=2)
        feats_proto = feats_source.view(n_way, n_shot, -1).mean(dim=1)
        labels_proto = labels_source.view(n_way, n_shot)[:, 0]
        pw_dist = (feats_query[:, None] - feats_proto[None, :]).norm(dim=-1, p=2)
        labels_pred = labels_proto[pw_dist.min(dim=1).indices].numpy()
        rows.append(_uni_metrics(labels_query, labels_pred))
    return {name: np.array([r[name] for r in rows]) for name in rows[0]}


@pytest.mark.parametrize("n_shot,n_way", [(1, None), (4, None), (8, 2)])
def test_fewshot_episodes_and_results_equal_uni(n_shot, n_way):
    train_x, train_y, test_x, test_y = _features(20, spread=2.5)
    ways = n_way or 4
    torch.manual_seed(7)  # UNI draws from the global torch generator
    reference_episodes = np.stack(list(_uni_sampler(train_y, test_y, 60, ways, n_shot)))
    result = fewshot(train_x, train_y, test_x, test_y, n_shot=n_shot, n_way=n_way, n_episodes=60, seed=7,
                     dtype=torch.float64)
    np.testing.assert_array_equal(result.support_indices, reference_episodes)
    reference = _uni_fewshot_loop(train_x.astype(np.float64), train_y, test_x.astype(np.float64), test_y,
                                  reference_episodes, ways, n_shot)
    for name, values in reference.items():
        np.testing.assert_allclose(result.per_episode[name], values, atol=1e-12, err_msg=name)
        # pandas' agg(["mean", "std"]) in UNI: sample standard deviation
        assert result.metrics[name]["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert result.metrics[name]["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
    assert result.per_episode["acc"].std() > 0  # episodes differ


def test_fewshot_replays_episodes_in_any_order_and_float32_agrees():
    train_x, train_y, test_x, test_y = _features(21, spread=2.5)
    first = fewshot(train_x, train_y, test_x, test_y, n_shot=4, n_episodes=40, seed=3)
    shuffled = np.random.default_rng(0).permuted(first.support_indices, axis=1)
    replay = fewshot(train_x, train_y, test_x, test_y, n_shot=4, support_indices=shuffled)
    for name in first.per_episode:
        np.testing.assert_allclose(replay.per_episode[name], first.per_episode[name], atol=1e-12)
    exact = fewshot(train_x, train_y, test_x, test_y, n_shot=4, n_episodes=40, seed=3, dtype=torch.float64)
    np.testing.assert_allclose(first.per_episode["acc"], exact.per_episode["acc"], atol=2 / len(test_y))
    other_seed = fewshot(train_x, train_y, test_x, test_y, n_shot=4, n_episodes=40, seed=4)
    assert not np.array_equal(other_seed.support_indices, first.support_indices)


def test_fewshot_errors_name_the_problem():
    train_x, train_y, test_x, test_y = _features(22, n_train=40)
    smallest = np.bincount(train_y).min()
    with pytest.raises(ValueError, match=f"need {smallest + 1} training samples per class"):
        fewshot(train_x, train_y, test_x, test_y, n_shot=smallest + 1, n_episodes=2)
    with pytest.raises(ValueError, match="n_way"):
        fewshot(train_x, train_y, test_x, test_y, n_shot=1, n_way=9, n_episodes=2)
    with pytest.raises(ValueError, match="support_indices"):
        fewshot(train_x, train_y, test_x, test_y, n_shot=1, support_indices=[[0, 1000]])


def test_sample_episodes_is_stratified():
    labels = np.repeat(np.arange(3), [5, 9, 4])
    episodes = sample_episodes(labels, num_classes=3, n_shot=4, n_way=3, n_episodes=50, seed=0)
    for row in episodes:
        assert len(set(row)) == 12  # without replacement
        np.testing.assert_array_equal(np.sort(np.bincount(labels[row], minlength=3)), [4, 4, 4])
        # the shots of one class are contiguous, in the order the classes were drawn
        assert (np.diff(labels[row]) != 0).sum() == 2


# --- ROI retrieval -----------------------------------------------------------------------------------

def _reference_retrieval(train_x, train_y, test_x, test_y):
    mean = train_x.mean(0, keepdims=True)
    db = train_x - mean
    q = test_x - mean
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    distances = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    top = np.argsort(distances, axis=1, kind="stable")[:, :5]
    labels = train_y[top]
    out = {f"acc@{k}": float(np.mean([(labels[i, :k] == test_y[i]).any() for i in range(len(q))])) for k in (1, 3, 5)}
    votes = [np.bincount(row, minlength=train_y.max() + 1) for row in labels]
    out["mv@5"] = float(np.mean([np.argmax(v) == t for v, t in zip(votes, test_y)]))
    return out, top


def test_retrieval_equals_a_brute_force_search():
    train_x, train_y, test_x, test_y = _features(30, spread=2.5)
    result = retrieval(train_x, train_y, test_x, test_y)
    reference, top = _reference_retrieval(train_x.astype(np.float64), train_y, test_x.astype(np.float64), test_y)
    assert result.metrics == pytest.approx(reference, abs=1e-12)
    np.testing.assert_array_equal(result.neighbours, top)
    assert result.metrics["acc@1"] <= result.metrics["acc@3"] <= result.metrics["acc@5"]
    assert 0.3 < result.metrics["acc@1"] < 1


def test_retrieval_hand_example():
    # Database on a circle; query 0 sits next to two class-1 points and three class-0 points.
    angles = np.deg2rad([0, 5, 10, 15, 20, 180])
    db = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = np.array([1, 0, 1, 0, 0, 1])
    query = db[[0]] * 1.0 + np.float32([0, -0.01])
    result = retrieval(db, labels, query, np.array([1]), center=False)
    assert result.metrics == {"acc@1": 1.0, "acc@3": 1.0, "acc@5": 1.0, "mv@5": 0.0}  # 3 of 5 say class 0
    np.testing.assert_array_equal(result.neighbours[0], [0, 1, 2, 3, 4])


# --- paired bootstrap, and the whole document -------------------------------------------------------

def test_paired_bootstrap_known_cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    good = np.where(rng.uniform(size=200) < 0.9, y, 1 - y)
    poor = np.where(rng.uniform(size=200) < 0.6, y, 1 - y)
    same = paired_bootstrap(probe_metrics, (y, good), (y, good), n=200, seed=1)
    assert same["acc"]["diff"] == 0 and same["acc"]["p_value"] == 1.0
    better = paired_bootstrap(probe_metrics, (y, good), (y, poor), n=200, seed=1)
    assert better["acc"]["diff"] == pytest.approx(probe_metrics(y, good)["acc"] - probe_metrics(y, poor)["acc"])
    assert better["acc"]["p_value"] == pytest.approx(2 / 201)  # no resample reverses a 0.3 gap
    assert better["acc"]["ci_low"] > 0
    # The p-value follows from the same resamples the CIs use (one bootstrap implementation).
    d = bootstrap_samples(lambda a, b, c, e: {"d": probe_metrics(a, b)["bacc"] - probe_metrics(c, e)["bacc"]},
                          y, good, y, poor[::-1].copy(), n=300, seed=2)["d"]
    mixed = paired_bootstrap(probe_metrics, (y, good), (y, poor[::-1].copy()), n=300, seed=2)
    expected = min(1, 2 * (min((d <= 0).sum(), (d >= 0).sum()) + 1) / 301)
    assert mixed["bacc"]["p_value"] == pytest.approx(expected)


def test_evaluate_tiles_document_matches_the_protocols():
    train_x, train_y, test_x, test_y = _features(40, n_train=60, n_test=40, classes=3, spread=2.0)
    settings = TileEvalSettings(shots=(1, 4, 64), episodes=20, max_iter=50, bootstrap=50, seed=0)
    doc = evaluate_tiles(train_x, train_y, test_x, test_y, settings=settings, class_names=["a", "b", "c"])
    assert doc["classes"] == ["a", "b", "c"] and (doc["n_train"], doc["n_test"]) == (60, 40)
    lin = linear_probe(train_x, train_y, test_x, test_y, max_iter=50)
    expected = evaluate(probe_metrics, lin.targets, lin.pred_index, lin.probs, n_bootstrap=50, seed=0)
    assert doc["protocols"]["linear"]["metrics"] == expected
    knn = knn_probe(train_x, train_y, test_x, test_y)
    assert doc["protocols"]["knn"]["metrics"]["bacc"]["value"] == knn.metrics["bacc"]
    assert np.asarray(doc["protocols"]["knn"]["confusion"]).sum() == 40
    few = doc["protocols"]["fewshot"]
    assert list(few["shots"]) == ["1", "4"] and few["skipped_shots"] == [64]
    assert few["shots"]["4"] == fewshot(train_x, train_y, test_x, test_y, n_shot=4, n_episodes=20).metrics
    ret = doc["protocols"]["retrieval"]["metrics"]
    assert ret["acc@5"]["value"] == retrieval(train_x, train_y, test_x, test_y).metrics["acc@5"]
    assert ret["acc@1"]["ci_low"] <= ret["acc@1"]["value"] <= ret["acc@1"]["ci_high"]
    subset = evaluate_tiles(train_x, train_y, test_x, test_y, settings=TileEvalSettings(protocols=("knn",),
                                                                                      bootstrap=0))
    assert list(subset["protocols"]) == ["knn"]
    with pytest.raises(ValueError, match="unknown protocol"):
        TileEvalSettings(protocols=("linear", "svm"))
