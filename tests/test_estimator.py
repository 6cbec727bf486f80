"""MUSETimeSeriesClassifier: scikit-learn's interface over the sequence recipe, on aeon's data layout."""
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from muse_lightning.datasets import to_sequence_arrays
from muse_lightning.estimator import MUSETimeSeriesClassifier

QUICK = {"dim": 32, "max_epochs": 8, "min_train_batches": 25}  # 200 steps: enough for the task below


def shapes(count: int, seed: int, steps: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """aeon's layout ``(n_cases, 1, steps)``: noise with one spike, up then down (label 7) or down then up (3)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 0.2, (count, 1, steps))
    y = np.where(np.arange(count) % 2 == 0, 7, 3)
    for i in range(count):
        start = rng.integers(0, steps - 6)
        X[i, 0, start:start + 6] += (1.0 if y[i] == 7 else -1.0) * np.array([1, 2, 1, -1, -2, -1])
    return X, y


def test_fit_learns_and_predicts_the_labels_as_given(capfd):
    X, y = shapes(40, seed=0)
    model = MUSETimeSeriesClassifier(**QUICK).fit(X, y)
    assert "GPU available" not in "".join(capfd.readouterr())  # quiet unless verbose
    assert model.classes_.tolist() == [3, 7]
    X_test, y_test = shapes(100, seed=1)
    probs = model.predict_proba(X_test)
    assert probs.shape == (100, 2) and np.allclose(probs.sum(1), 1.0)
    assert model.score(X_test, y_test) > 0.85  # chance is 0.5
    assert set(model.predict(X_test).tolist()) <= {3, 7}


def test_unequal_lengths_as_a_list_predict_as_each_case_alone():
    X, y = shapes(20, seed=0)
    cases = [x[:, : 20 + i % 12] for i, x in enumerate(X)]  # (n_channels, n_timepoints) of 20-31 steps
    model = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=2).fit(cases, y)
    together = model.predict_proba(cases)
    alone = np.concatenate([model.predict_proba([case]) for case in cases])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding in a batch changes nothing


def test_max_length_lets_predict_take_series_longer_than_fit_saw():
    X, y = shapes(20, seed=0)
    cases = [x[:, : 20 + i % 6] for i, x in enumerate(X)]  # 20-25 steps, as unequal-length sets have
    longer = [x[:, :29] for x in shapes(4, seed=1)[0]]  # the test split's longest case is longer
    model = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=2, max_length=29).fit(cases, y)
    assert model.module_.hparams.max_length == 29
    probs = model.predict_proba(longer)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(1), 1.0)


def test_differences_add_the_slopes_as_channels_and_keep_padding_exact():
    X, y = shapes(20, seed=0)
    cases = [x[:, : 20 + i % 12] for i, x in enumerate(X)]
    model = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=2, differences=True).fit(cases, y)
    assert model.n_channels_ == 1 and model.module_.hparams.in_features == 2  # the series and its slopes
    together = model.predict_proba(cases)
    alone = np.concatenate([model.predict_proba([case]) for case in cases])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_clone_and_cross_val_score_work_as_for_any_scikit_learn_classifier():
    model = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=3, random_state=5)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy.random_state == 5
    assert copy.set_params(depth=1).depth == 1
    X, y = shapes(24, seed=2)
    scores = cross_val_score(model, X, y, cv=2)
    assert scores.shape == (2,) and ((0 <= scores) & (scores <= 1)).all()


def test_the_same_seed_fits_the_same_model():
    X, y = shapes(16, seed=3)
    a = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=3, random_state=1).fit(X, y)
    b = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=3, random_state=1).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


@pytest.mark.parametrize(("X", "match"), [
    (np.zeros((2, 1, 3, 4)), r"X must be \(n_cases, n_channels, n_timepoints\) or \(n_cases, n_timepoints\)"),
    ([np.zeros((1, 5)), np.zeros((2, 5))], r"one number of channels, got \[1, 2\]"),
    ([np.zeros((1, 2, 5))], "case 0 has shape"),
    ("abc", "X must be a numpy array or a list"),
    (np.zeros((0, 1, 5)), "X holds no cases"),
])
def test_bad_X_is_named(X, match):
    with pytest.raises((ValueError, TypeError), match=match):
        to_sequence_arrays(X)


def test_bad_fit_and_predict_calls_are_named():
    model = MUSETimeSeriesClassifier(dim=32, max_epochs=1, min_train_batches=1)
    X, y = shapes(8, seed=0)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        model.predict(X)
    with pytest.raises(ValueError, match=r"y must hold one label per case \(8\)"):
        model.fit(X, y[:5])
    with pytest.raises(ValueError, match="at least 2 classes"):
        model.fit(X, np.zeros(8))
    model.fit(X, y)
    with pytest.raises(ValueError, match="X has 2 channels, the classifier was fitted on 1"):
        model.predict(np.zeros((2, 2, 32)))
    with pytest.raises(ValueError, match="longer than the 32 the classifier takes: fit it with max_length"):
        model.predict(np.zeros((2, 1, 40)))
    with pytest.raises(ValueError, match="the data's max_length=32 exceeds the model's max_length=20"):
        clone(model).set_params(max_length=20).fit(X, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.predict(np.full((2, 1, 32), np.nan))


def test_the_defaults_are_the_shipped_sequence_config():
    """The estimator runs the recipe of configs/sequence_files.yaml: every value that config sets and the
    estimator takes is the estimator's default."""
    import inspect
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "sequence_files.yaml").read_text())
    model = config["model"]["init_args"]
    recipe = {**model, **model["mixer"], **model["optimizer"]["init_args"], **config["data"]["init_args"],
              "max_epochs": config["trainer"]["max_epochs"],
              "random_state": config["seed_everything"], "accelerator": config["trainer"]["accelerator"],
              "precision": config["trainer"]["precision"]}
    defaults = {k: p.default for k, p in inspect.signature(MUSETimeSeriesClassifier).parameters.items()}
    shared = sorted(set(recipe) & set(defaults))
    assert len(shared) >= 18
    assert {k: list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k] for k in shared} == {k: recipe[k] for k in shared}


# The checks whose premise does not hold for a time-series classifier, each with the reason.
NOT_FOR_TIME_SERIES = {
    "check_n_features_in": "a time point is not a feature: series of any length up to the fitted one are taken",
    "check_n_features_in_after_fitting": "a time point is not a feature: series of any length up to the fitted one are taken",
    "check_estimators_empty_data_messages": "the error names time points, not features",
}


@parametrize_with_checks(
    [MUSETimeSeriesClassifier(dim=16, depth=1, num_heads=2, max_epochs=1, min_train_batches=40)],
    expected_failed_checks=lambda estimator: NOT_FOR_TIME_SERIES,
)
def test_passes_scikit_learns_estimator_checks(estimator, check):
    """scikit-learn's own conformance checks (check_estimator), a 2-D X read as one-channel series."""
    check(estimator)
