"""DeepClusterer as a scikit-learn estimator: scikit-learn's own checks, Pipeline and GridSearchCV with a label-free
scorer, the input forms a scikit-learn user passes, and a loaded model's parameters."""
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import check_is_fitted

from clustering import DeepClusterer, metrics, modularity_scorer, modularity_x_evenness_scorer
from clustering.config import ConfigError

# scikit-learn's checks that feed rows of 1 to 10 feature values (blobs, iris): those are no images, and the
# estimator refuses them, saying to give image_shape (or, for one image, [image]). Every other check runs.
NOT_IMAGES = "the check's data are rows of 1 to 10 feature values, not images: refused, naming image_shape"
ROW_CHECKS = [
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_estimators_dtypes", "check_complex_data", "check_dtype_object", "check_estimators_empty_data_messages",
    "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_transformer_data_not_an_array", "check_transformer_general",
    "check_clustering", "check_methods_sample_order_invariance", "check_methods_subset_invariance",
    "check_fit2d_1sample", "check_fit2d_1feature", "check_dict_unchanged", "check_fit_idempotent",
    "check_fit_check_is_fitted", "check_n_features_in", "check_fit2d_predict1d",
]


@parametrize_with_checks([DeepClusterer("kmeans", n_clusters=3)],
                         expected_failed_checks=lambda est: {name: NOT_IMAGES for name in ROW_CHECKS})
def test_scikit_learns_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.data / 16.0, d.images, d.target


def test_a_pipeline_and_a_grid_search_with_a_label_free_scorer(digits):
    rows, _, y = digits
    pipe = Pipeline([("deepclusterer", DeepClusterer("kmeans", image_shape=(8, 8)))])
    pipe.set_params(deepclusterer__n_clusters=6, deepclusterer__random_state=1)
    assert pipe.fit(rows).predict(rows[:5]).shape == (5,) and pipe.named_steps["deepclusterer"].config_.k == 6
    check_is_fitted(pipe)
    for scorer in (modularity_scorer, modularity_x_evenness_scorer):
        search = GridSearchCV(DeepClusterer("kmeans", image_shape=(8, 8)), {"n_clusters": [4, 10]},
                              scoring=scorer, cv=2).fit(rows)
        assert search.best_params_ == {"n_clusters": 10}  # chosen without labels; the digits are 10 classes
        assert metrics.cluster_acc(y, search.best_estimator_.labels_) > 0.6


def test_parameters_repr_clone_and_not_fitted():
    est = DeepClusterer("nmm", n_clusters=8, joint_epochs=3, random_state=2)
    assert est.get_params()["joint_epochs"] == 3 and est.get_params()["n_clusters"] == 8
    assert repr(est) == "DeepClusterer(joint_epochs=3, n_clusters=8, random_state=2)"
    est.set_params(heads=2, n_clusters=9)
    assert clone(est).get_params() == {**est.get_params(), "heads": 2, "n_clusters": 9}
    with pytest.raises(NotFittedError, match="not fitted"):
        est.predict(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="n_clusters=5 and k=4 name one setting"):
        DeepClusterer("kmeans", n_clusters=5, k=4).fit(np.zeros((20, 8, 8), np.uint8))


def test_flat_rows_one_image_lists_and_values_outside_0_1(digits):
    rows, images, y = digits
    with pytest.warns(UserWarning, match="taking the 1797 rows of 64 values as 8x8 images"):
        a = DeepClusterer("kmeans").fit(rows).labels_
    b = DeepClusterer("kmeans", image_shape=(8, 8)).fit(rows).labels_
    with pytest.warns(UserWarning, match="run 0..16, not 0..1"):  # load_digits().images: mapped from 0..16
        est = DeepClusterer("kmeans").fit(images)
    assert np.array_equal(a, b) and np.array_equal(est.labels_, a)
    assert est.value_range_ == (0.0, 16.0) and est.n_features_in_ == 64
    assert est.predict(images[0]).shape == (1,) and est.predict(list(images[:4])).shape == (4,)
    assert est.predict(images[0])[0] == est.labels_[0]  # one image, mapped as the fitted ones were
    with pytest.raises(ValueError, match="rows of images need image_shape"):
        DeepClusterer("kmeans").fit(np.zeros((30, 10)))


def test_a_loaded_model_has_its_training_settings(digits, tmp_path):
    _, images, _ = digits
    x = np.round(images * 255 / 16).astype(np.uint8)
    est = DeepClusterer("nmm", n_clusters=6, joint_epochs=2, heads=2, batch_size=128, random_state=3).fit(x)
    loaded = DeepClusterer.load(est.save(str(tmp_path / "ckpt")))
    params = loaded.get_params()
    assert (params["method"], params["n_clusters"], params["random_state"]) == ("nmm", 6, 3)
    assert params["joint_epochs"] == 2 and params["heads"] == 2 and params["batch_size"] == 128
    again = clone(loaded).fit(x)
    assert again.config_ == est.config_
