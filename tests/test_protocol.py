import pytest

from slca_cli.errors import SlcaError
from slca_cli.protocol import class_order, resolve_task_sizes, task_classes, task_of_class


def test_class_order_matches_the_authors_seed_1993():
    order = class_order(100, 1993)
    assert order[:4] == [68, 56, 78, 8]
    assert sorted(order) == list(range(100))


def test_class_order_is_deterministic_and_seed_dependent():
    assert class_order(50, 3) == class_order(50, 3)
    assert class_order(50, 3) != class_order(50, 4)


@pytest.mark.parametrize("n, tasks, init, inc, expected", [
    (100, None, 10, 10, [10] * 10),
    (196, None, 20, 20, [20] * 9 + [16]),
    (196, 10, None, None, [20] * 9 + [16]),
    (200, 10, None, None, [20] * 10),
    (100, 3, None, None, [34, 34, 32]),
    (100, 6, 50, None, [50, 10, 10, 10, 10, 10]),
    (10, 1, None, None, [10]),
    (9, None, 5, 3, [5, 3, 1]),
    (4, 3, None, None, [2, 1, 1]),
    (10, 4, None, None, [3, 3, 3, 1]),
    (10, 6, None, None, [2, 2, 2, 2, 1, 1]),
    (5, 5, None, None, [1] * 5),
])
def test_task_sizes(n, tasks, init, inc, expected):
    assert resolve_task_sizes(n, tasks, init, inc) == expected


def test_more_tasks_than_classes_is_an_error():
    with pytest.raises(SlcaError, match="more than the 5 classes"):
        resolve_task_sizes(5, 6)


def test_inconsistent_split_names_the_flags():
    with pytest.raises(SlcaError, match="--increment"):
        resolve_task_sizes(100, 3, 10, 10)


def test_task_classes_and_task_of_class():
    assert task_classes([2, 3]) == [[0, 1], [2, 3, 4]]
    assert task_of_class([2, 3]).tolist() == [0, 0, 1, 1, 1]
