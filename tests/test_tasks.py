"""Task families: split hygiene, determinism, label permutations, configuration errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from workers.tasks import FAMILIES, SPLITS, TaskConfig, make_family

NUM_STEPS = 4


@pytest.fixture(scope="module")
def digits():
    config = TaskConfig(family="digits", batch_size=16, num_query=30)
    return {split: make_family(config, split) for split in SPLITS}


def row_index(family, pool: str) -> dict[bytes, int]:
    """Map each (normalized) pool row to its original class id."""
    data = family.data.support_x if pool == "support" else family.data.query_x
    counts = family.data.support_count if pool == "support" else family.data.query_count
    rows = {}
    for c, cls in enumerate(family.classes):
        for row in np.asarray(data[c, : int(counts[c])]):
            rows[row.tobytes()] = cls
    return rows


def test_default_splits_hold_out_the_last_classes(digits):
    assert digits["train"].classes == tuple(range(7))
    assert digits["validation"].classes == digits["test"].classes == (7, 8, 9)
    assert all(f.num_inputs == 64 and f.num_classes == 3 for f in digits.values())


def test_example_pools_are_disjoint_between_support_query_and_splits(digits):
    ids = {}
    for split, family in digits.items():
        for c, cls in enumerate(family.classes):
            support, query = family.support_ids[c], family.query_ids[c]
            support, query = set(support[support >= 0]), set(query[query >= 0])
            assert support and query and not support & query
            ids[split, cls] = support | query
    for cls in (7, 8, 9):  # digits has no test file: validation and test get disjoint halves
        assert not ids["validation", cls] & ids["test", cls]
        assert abs(len(ids["validation", cls]) - len(ids["test", cls])) <= 1
    np.testing.assert_array_equal(digits["train"].normalization[0], digits["test"].normalization[0])


def test_train_tasks_never_contain_a_heldout_class_or_example(digits):
    train = digits["train"]
    tasks = jax.tree.map(np.asarray, train.sample(jax.random.PRNGKey(0), 48, NUM_STEPS))
    support_rows, query_rows = row_index(train, "support"), row_index(train, "query")
    heldout = set()
    for split in ("validation", "test"):
        heldout |= set(row_index(digits[split], "support")) | set(row_index(digits[split], "query"))
    seen_classes = set()
    for x in tasks.support_x.reshape(-1, 64):
        assert x.tobytes() not in heldout
        seen_classes.add(support_rows[x.tobytes()])  # KeyError: a row from outside the support pools
    for x in tasks.query_x.reshape(-1, 64):
        assert x.tobytes() not in heldout
        seen_classes.add(query_rows[x.tobytes()])
    assert seen_classes == set(range(7))


def test_labels_are_in_range_consistent_within_a_task_and_permuted_across_tasks(digits):
    family = digits["validation"]
    tasks = jax.tree.map(np.asarray, family.sample(jax.random.PRNGKey(1), 24, NUM_STEPS))
    classes_of = {**row_index(family, "support"), **row_index(family, "query")}
    mappings = set()
    for k in range(24):
        xs = np.concatenate([tasks.support_x[k].reshape(-1, 64), tasks.query_x[k]])
        ys = np.concatenate([tasks.support_y[k].reshape(-1), tasks.query_y[k]])
        assert ys.min() >= 0 and ys.max() < 3
        mapping = {}
        for x, y in zip(xs, ys):
            assert mapping.setdefault(int(y), classes_of[x.tobytes()]) == classes_of[x.tobytes()]
        assert sorted(mapping) == [0, 1, 2]
        mappings.add(tuple(mapping[j] for j in range(3)))
        np.testing.assert_array_equal(np.bincount(tasks.query_y[k], minlength=3), [10, 10, 10])
        assert len({x.tobytes() for x in tasks.query_x[k]}) == 30  # pools are big enough: no repeats
    assert len(mappings) >= 4  # 6 permutations of the 3 held-out classes


@pytest.mark.parametrize("config", [
    TaskConfig(family="digits", batch_size=8, num_query=12, projection_dim=20),
    TaskConfig(family="toy2d", batch_size=8, num_query=12),
    TaskConfig(family="teacher_student", batch_size=8, num_query=12, teacher_input_dim=6),
], ids=["digits-projected", "toy2d", "teacher_student"])
def test_task_is_identical_alone_or_in_a_batch_of_any_size(config):
    family = make_family(config, "train")
    key = jax.random.PRNGKey(7)
    batch = family.sample(key, 5, NUM_STEPS)
    for index in (0, 3):
        alone = family.sample_one(key, index, NUM_STEPS)
        for single, field in zip(alone, batch):
            np.testing.assert_array_equal(np.asarray(single), np.asarray(field[index]))
    assert batch.support_x.shape == (5, NUM_STEPS, 8, family.num_inputs)
    assert batch.support_y.dtype == np.int32 and batch.query_x.shape == (5, 12, family.num_inputs)
    assert not np.array_equal(np.asarray(batch.support_x[0]), np.asarray(batch.support_x[1]))


def test_a_larger_batch_only_appends_tasks(digits):
    key = jax.random.PRNGKey(3)
    small, large = digits["test"].sample(key, 2, NUM_STEPS), digits["test"].sample(key, 6, NUM_STEPS)
    for field, field_large in zip(small, large):
        np.testing.assert_array_equal(np.asarray(field), np.asarray(field_large[:2]))


def test_toy2d_splits_use_disjoint_functions_and_seeds():
    config = TaskConfig(family="toy2d", batch_size=16, num_query=32)
    families = {split: make_family(config, split) for split in SPLITS}
    assert families["train"].functions == ("xor", "and", "two_moons")
    assert not set(families["train"].functions) & set(families["test"].functions)
    ranges = [range(*families[s].seed_range) for s in SPLITS]
    assert all(max(a.start, b.start) >= min(a.stop, b.stop) for i, a in enumerate(ranges) for b in ranges[i + 1:])
    tasks = families["test"].sample(jax.random.PRNGKey(0), 16, NUM_STEPS)
    labels = np.asarray(tasks.support_y).reshape(16, -1)
    assert np.all((labels == 0) | (labels == 1))
    assert np.mean([len(np.unique(row)) == 2 for row in labels]) > 0.8
    same_key = families["validation"].sample(jax.random.PRNGKey(0), 16, NUM_STEPS)
    assert not np.array_equal(np.asarray(tasks.support_x), np.asarray(same_key.support_x))


def test_teacher_student_splits_use_different_teachers():
    config = TaskConfig(family="teacher_student", batch_size=16, num_query=32, teacher_input_dim=6)
    train, test = make_family(config, "train"), make_family(config, "test")
    assert train.seed_range[1] <= test.seed_range[0]
    a = train.sample(jax.random.PRNGKey(0), 4, NUM_STEPS)
    b = test.sample(jax.random.PRNGKey(0), 4, NUM_STEPS)
    assert not np.array_equal(np.asarray(a.support_x), np.asarray(b.support_x))
    assert set(np.unique(np.asarray(a.support_y))) == {0, 1, 2}


def test_fashion_mnist_family_tests_on_the_test_file_with_train_statistics():
    config = TaskConfig(family="fashion_mnist", resize=14, crop=10, batch_size=8, num_query=12)
    train, test = make_family(config, "train"), make_family(config, "test")
    assert test.source == "test" and train.source == "train"
    assert test.classes == (7, 8, 9) and test.num_inputs == 100
    # 1000 test images per held-out class, cut into query (30%) and support pools
    np.testing.assert_array_equal(np.asarray(test.data.query_count), [300] * 3)
    np.testing.assert_array_equal(np.asarray(test.data.support_count), [700] * 3)
    np.testing.assert_array_equal(train.normalization[1], test.normalization[1])
    support_x = np.asarray(train.data.support_x)
    assert abs(float(support_x[support_x != 0].std()) - 1.0) < 0.1


def test_mnist1d_family_builds_from_the_local_generator(tmp_path):
    config = TaskConfig(family="mnist1d", cache_dir=str(tmp_path), n_way=2, batch_size=4, num_query=8)
    family = make_family(config, "validation")
    assert family.num_inputs == 40 and family.classes == (7, 8, 9) and family.source == "train"


def test_overlapping_classes_are_rejected_unless_allowed_and_then_examples_stay_disjoint():
    overlapping = dict(family="digits", train_classes=(0, 1, 2, 3), validation_classes=(3, 4, 5))
    with pytest.raises(ValueError, match="overlap"):
        make_family(TaskConfig(**overlapping), "train")
    config = TaskConfig(**overlapping, allow_overlap=True)
    train, validation = make_family(config, "train"), make_family(config, "validation")
    train_ids = set(train.support_ids[3]) | set(train.query_ids[3])
    validation_ids = set(validation.support_ids[0]) | set(validation.query_ids[0])
    assert not (train_ids & validation_ids) - {-1}


@pytest.mark.parametrize("kwargs, message", [
    (dict(family="nope"), "unknown task family"),
    (dict(family="digits", n_way=4), "fewer than n_way=4"),
    (dict(family="toy2d", n_way=3), "binary"),
    (dict(family="toy2d", train_functions=("spiral",)), "unknown toy functions"),
    (dict(family="teacher_student", seed_ranges=((0, 10), (5, 20), (20, 30))), "overlap"),
    (dict(family="digits", test_source="test"), "no 'test' file"),
])
def test_bad_configs_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_family(TaskConfig(**kwargs), "train")


def test_every_registered_family_is_described():
    assert set(FAMILIES) == {"digits", "fashion_mnist", "mnist", "idx", "mnist1d", "toy2d", "teacher_student"}
    for info in FAMILIES.values():
        assert info.description and all(hasattr(TaskConfig(), option) for option in info.options)


# ------------------------------------------------------------------------------------- meta-augmentation

AUGMENTED = dict(family="digits", batch_size=8, num_query=12)


def _shift_image(x: np.ndarray, side: int, dr: int, dc: int) -> np.ndarray:
    """NumPy reference of a zero-filled 2-D shift of flattened side x side images."""
    images = x.reshape(x.shape[:-1] + (side, side))
    out = np.zeros_like(images)
    rows_to, rows_from = slice(max(dr, 0), side + min(dr, 0)), slice(max(-dr, 0), side - max(dr, 0))
    cols_to, cols_from = slice(max(dc, 0), side + min(dc, 0)), slice(max(-dc, 0), side - max(dc, 0))
    out[..., rows_to, cols_to] = images[..., rows_from, cols_from]
    return out.reshape(x.shape)


def test_augmented_tasks_are_the_plain_tasks_transformed_by_their_own_draw():
    plain = make_family(TaskConfig(**AUGMENTED), "train")
    augmented = make_family(TaskConfig(**AUGMENTED, augment_shift=2, augment_permute=True, augment_sign_flip=True),
                            "train")
    key = jax.random.key(3)
    a, b = plain.sample(key, 4, NUM_STEPS), augmented.sample(key, 4, NUM_STEPS)
    draws = [augmented.augmentation(key, i) for i in range(4)]
    for i, draw in enumerate(draws):
        dr, dc = (int(v) for v in draw.shift)
        perm, signs = np.asarray(draw.permutation), np.asarray(draw.signs)
        for plain_x, aug_x in ((a.support_x[i], b.support_x[i]), (a.query_x[i], b.query_x[i])):
            expected = _shift_image(np.asarray(plain_x), 8, dr, dc)[..., perm] * signs
            np.testing.assert_array_equal(np.asarray(aug_x), expected)
        np.testing.assert_array_equal(a.support_y[i], b.support_y[i])  # labels are untouched
        np.testing.assert_array_equal(a.query_y[i], b.query_y[i])
    # different tasks get different transforms; the same key gives the same one
    assert len({np.asarray(d.permutation).tobytes() for d in draws}) == 4
    assert len({np.asarray(d.signs).tobytes() for d in draws}) == 4
    again = augmented.sample(key, 4, NUM_STEPS)
    np.testing.assert_array_equal(np.asarray(again.support_x), np.asarray(b.support_x))
    np.testing.assert_array_equal(np.asarray(augmented.augmentation(key, 2).permutation),
                                  np.asarray(draws[2].permutation))
    assert {tuple(int(v) for v in d.shift) for d in draws} != {(0, 0)}


def test_augmentation_never_mixes_train_and_heldout_examples(digits):
    config = TaskConfig(**AUGMENTED, augment_permute=True, augment_sign_flip=True)
    train = make_family(config, "train")
    key = jax.random.key(11)
    tasks = train.sample(key, 3, NUM_STEPS)
    train_rows = row_index(train, "support")
    heldout_rows = set()
    for split in ("validation", "test"):
        heldout_rows |= set(row_index(make_family(config, split), "support"))
        heldout_rows |= set(row_index(make_family(config, split), "query"))
    for i in range(3):
        draw = train.augmentation(key, i)
        perm, signs = np.asarray(draw.permutation), np.asarray(draw.signs)
        x = np.asarray(tasks.support_x[i]).reshape(-1, train.num_inputs)
        original = np.zeros_like(x)
        original[:, perm] = x / signs  # invert x[perm] * signs
        labels = np.asarray(tasks.support_y[i]).reshape(-1)
        classes = {}
        for row, label in zip(original, labels):
            key_bytes = row.astype(np.float32).tobytes()
            assert key_bytes in train_rows and key_bytes not in heldout_rows
            classes.setdefault(int(label), set()).add(train_rows[key_bytes])
        assert all(len(c) == 1 for c in classes.values())  # one original class per label within a task


def test_augmentation_defaults_to_the_meta_train_split_and_noise_is_per_example():
    noisy = TaskConfig(**AUGMENTED, augment_noise=0.5)
    plain = TaskConfig(**AUGMENTED)
    key = jax.random.key(5)
    for split in ("validation", "test"):  # held-out tasks are the plain ones
        np.testing.assert_array_equal(np.asarray(make_family(noisy, split).sample(key, 2, NUM_STEPS).query_x),
                                      np.asarray(make_family(plain, split).sample(key, 2, NUM_STEPS).query_x))
    everywhere = TaskConfig(**AUGMENTED, augment_noise=0.5, augment_splits="all")
    diff = (np.asarray(make_family(everywhere, "test").sample(key, 2, NUM_STEPS).support_x)
            - np.asarray(make_family(plain, "test").sample(key, 2, NUM_STEPS).support_x))
    assert abs(diff.std() - 0.5) < 0.02 and abs(diff.mean()) < 0.02
    assert not np.allclose(diff[0, 0, 0], diff[0, 0, 1])  # fresh noise for every example


def test_mnist1d_shifts_are_one_dimensional_and_synthetic_families_refuse_them(tmp_path):
    config = TaskConfig(family="mnist1d", batch_size=4, num_query=6, augment_shift=3, cache_dir=str(tmp_path))
    family = make_family(config, "train")
    key = jax.random.key(2)
    plain = make_family(TaskConfig(family="mnist1d", batch_size=4, num_query=6, cache_dir=str(tmp_path)), "train")
    draw = family.augmentation(key, 0)
    assert draw.shift.shape == (1,)
    s = int(draw.shift[0])
    x = np.asarray(plain.sample(key, 1, 2).support_x[0])
    expected = np.zeros_like(x)
    if s >= 0:
        expected[..., s:] = x[..., :x.shape[-1] - s]
    else:
        expected[..., :s] = x[..., -s:]
    np.testing.assert_array_equal(np.asarray(family.sample(key, 1, 2).support_x[0]), expected)
    with pytest.raises(ValueError, match="augment_shift needs image"):
        TaskConfig(family="toy2d", augment_shift=1)
    with pytest.raises(ValueError, match="augment_splits"):
        TaskConfig(family="digits", augment_splits="test")
