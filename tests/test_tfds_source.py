"""``tfds:`` data sources: TFDS datasets written here in the array_record format and read back through
``read_conversations`` without TensorFlow (tensorflow-datasets + array_record only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from emajax.train.sources import DataError, read_conversations
from emajax.train.tfds_source import parse_tfds_spec, plain_row

CHATS = [[{"role": "user", "content": f"question {i} é"}, {"role": "assistant", "content": f"answer {i}"}]
         for i in range(3)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A data_dir with two prepared datasets: ``emajax_test_chats`` (a ``messages`` Sequence; train 3, test 1)
    and ``emajax_test_pairs`` (``prompt``/``response`` texts and a ``label`` integer)."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed "
                                                              "(pip install 'emajax[tfds]')")
    pytest.importorskip("array_record", reason="array_record is not installed (pip install 'emajax[tfds]')")
    text = tfds.features.Text

    class EmajaxTestChats(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"messages": tfds.features.Sequence({"role": text(), "content": text()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(CHATS), "test": self._generate_examples(CHATS[:1])}

        def _generate_examples(self, chats):
            for i, c in enumerate(chats):
                yield i, {"messages": c}

    class EmajaxTestPairs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"prompt": text(), "response": text(), "label": tfds.features.Scalar(dtype=np.int64)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, (p, r) in enumerate([("hi", "hello"), ("bye", ""), ("why", "because")]):
                yield i, {"prompt": p, "response": r, "label": i % 2}

    root = tmp_path_factory.mktemp("tfds")
    for cls in (EmajaxTestChats, EmajaxTestPairs):
        cls(data_dir=str(root), file_format="array_record").download_and_prepare()
    return root


def test_messages_by_name_split_and_slice(tfds_dir):
    assert read_conversations(f"tfds:emajax_test_chats?data_dir={tfds_dir}") == CHATS
    assert read_conversations(f"tfds:emajax_test_chats@test?data_dir={tfds_dir}") == CHATS[:1]
    assert read_conversations(f"tfds:emajax_test_chats:1.0.0@train[1:]?data_dir={tfds_dir}") == CHATS[1:]


def test_rl_prompt_rows(tfds_dir):
    """The RL prompt reader takes the same source: raw rows with their location, every feature kept."""
    from emajax.rl.prompts import _rows

    rows = _rows(f"tfds:emajax_test_pairs?data_dir={tfds_dir}&label=1")
    assert [(where.rsplit(" ", 1)[-1], row["prompt"], row["label"]) for where, row in rows] == [("1", "bye", 1)]


def test_dataset_directory(tfds_dir):
    assert read_conversations(f"tfds:{tfds_dir / 'emajax_test_chats' / '1.0.0'}@test") == CHATS[:1]


def test_prompt_response_rows_and_filters(tfds_dir):
    src = f"tfds:emajax_test_pairs?data_dir={tfds_dir}"
    with pytest.raises(DataError, match=r"emajax_test_pairs.* row 1: field 'response' is missing or empty"):
        read_conversations(src)
    got = read_conversations(src + "&label=0")  # the integer feature compares as text, as hf: filters do
    assert got == [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                   for p, r in (("hi", "hello"), ("why", "because"))]
    with pytest.raises(DataError, match=r"filter feature 'harm' is not in the dataset \(features: "):
        read_conversations(src + "&harm=0")


def test_errors_name_the_source(tfds_dir):
    with pytest.raises(DataError, match=r"tfds:emajax_test_chats@validation\?.*Unknown split 'validation'"):
        read_conversations(f"tfds:emajax_test_chats@validation?data_dir={tfds_dir}")
    with pytest.raises(DataError, match=r"tfds:no_such_dataset_xyz.*not found.*file_format='array_record'"):
        read_conversations(f"tfds:no_such_dataset_xyz?data_dir={tfds_dir}")


def test_never_imports_tensorflow(tfds_dir):
    """The point of the source: reading imports no TensorFlow (a fresh process, so no other test's imports
    count; where TensorFlow is not installed, as on the reference machine, this is the run without it)."""
    code = ("import sys\n"
            "from emajax.train.sources import read_conversations\n"
            f"print(len(read_conversations('tfds:emajax_test_chats?data_dir={tfds_dir}')))\n"
            "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "3"


def test_spec_parsing_and_decoding():
    assert parse_tfds_spec("wmt/de-en:1.0.0@train[:10]?data_dir=/d&lang=de") == (
        "wmt/de-en:1.0.0", "train[:10]", {"data_dir": "/d"}, {"lang": "de"})
    assert parse_tfds_spec("name") == ("name", "train", {}, {})
    with pytest.raises(DataError, match="no dataset name"):
        parse_tfds_spec("@train")
    row = {"messages": {"role": [b"user"], "content": np.array([b"x"], dtype=object)}, "n": np.int64(3)}
    assert plain_row(row) == {"messages": [{"role": "user", "content": "x"}], "n": 3}


def test_missing_tensorflow_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(DataError, match=r"tfds:mnist: reading TFDS datasets needs tensorflow-datasets"):
        read_conversations("tfds:mnist")
