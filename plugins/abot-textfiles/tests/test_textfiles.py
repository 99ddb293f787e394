from types import SimpleNamespace

import pytest

from abot.errors import AbotError
from abot_textfiles import textfiles


def test_train_and_eval_split_the_files(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}")
    data = SimpleNamespace(eval_fraction=0.2)
    train = list(textfiles(data, "train", 0, str(tmp_path))(0))
    held = list(textfiles(data, "eval", 0, str(tmp_path))(0))
    assert len(train) + len(held) == 40 and not set(train) & set(held) and held
    assert list(textfiles(data, "train", 0, str(tmp_path))(1)) != train  # reshuffled per epoch
    assert sorted(textfiles(data, "train", 0, str(tmp_path))(1)) == sorted(train)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AbotError, match="no \\*.txt files"):
        textfiles(SimpleNamespace(eval_fraction=0.1), "train", 0, str(tmp_path))
