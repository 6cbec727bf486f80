"""Tokenizers: bytes, vocabularies trained by Hugging Face tokenizers, users' tokenizer.json; kept in checkpoints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muse_lightning import TextClassifier, TextFileDataModule, WordNetGlossesDataModule
from muse_lightning.cli import main
from muse_lightning.datasets import load_embedded_wordnet_glosses
from muse_lightning.text import MUSETextNet
from muse_lightning.tokenization import TRAINED_KINDS, ByteTokenizer, HFTokenizer

CONFIGS = Path(__file__).parents[1] / "configs"
TEXTS = load_embedded_wordnet_glosses()[0][:2000]
SAMPLE = ["a small domesticated carnivorous mammal", "move fast by using one's feet", "Zyzzyva!"]


def test_byte_tokenizer_pads_and_truncates():
    tok = ByteTokenizer(max_length=4)
    assert tok.encode("héllo").tolist() == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1, ord("l") + 1]
    batch = tok.collate([(tok.encode("ab"), 1), (tok.encode("abcd"), 0)])
    assert batch["input_ids"].tolist() == [[98, 99, 0, 0], [98, 99, 100, 101]]


@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_a_trained_vocabulary_encodes_words_as_tokens_and_survives_its_json(kind):
    tok = HFTokenizer.train(kind, TEXTS, vocab_size=800, max_length=32)
    assert tok.pad_id == 0 and tok.tokenizer.token_to_id("[UNK]") == 1 and tok.vocab_size <= 800
    ids = tok.encode(SAMPLE[0])
    assert 0 < len(ids) < len(SAMPLE[0]) and int(ids.min()) > 0  # fewer tokens than bytes, none of them padding
    assert tok.tokenizer.decode(ids.tolist()).replace(" ", "") == SAMPLE[0].replace(" ", "")  # a round trip
    assert len(tok.encode(" ".join(SAMPLE * 20))) == 32  # cut at max_length
    again = HFTokenizer.from_str(tok.to_str(), max_length=32)
    assert all(torch.equal(again.encode(t), tok.encode(t)) for t in SAMPLE)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_the_same_texts_train_the_same_vocabulary(kind):
    """Seed parity for the recipes' vocabularies: Hugging Face's Unigram trainer orders pieces of equal score
    (here many: the words are drawn uniformly) in hash-map order, new each run, and a piece's id is its place;
    the rare characters it must keep (as in real reviews: "naïve", "¿qué") get the bottom scores in that order."""
    import random
    rng = random.Random(0)
    words = [f"word{i}" for i in range(40)] + ["gripping", "lovely", "moving", "dull", "clumsy", "tedious"]
    rare = ["naïve", "æsthetic", "rôle", "röle", "dûst", "well‐made", "¿qué", "a>b", "zzzzzzzz"]
    texts = [" ".join(rng.choice(words) for _ in range(8)) + f" {i}" for i in range(2000)] + rare
    first, *others = (HFTokenizer.train(kind, texts, vocab_size=100, max_length=32).to_str() for _ in range(4))
    assert all(other == first for other in others)


def test_a_users_tokenizer_json_is_used_as_it_is(tmp_path):
    trained = HFTokenizer.train("wordpiece", TEXTS, vocab_size=600, max_length=16)
    trained.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t.replace(',', ' ')},{i % 2}\n" for i, t in enumerate(TEXTS[:40])))
    dm = TextFileDataModule(str(tmp_path / "train.csv"), tokenizer=str(tmp_path / "tokenizer.json"), max_length=16)
    assert dm.vocab_size == trained.vocab_size and dm.pad_id == 0
    assert torch.equal(dm.tokenizer.encode(SAMPLE[1]), trained.encode(SAMPLE[1]))


@pytest.mark.parametrize(("tokenizer", "error", "match"), [
    ("missing.json", FileNotFoundError, "tokenizer: no such file .*missing.json"),
    ("broken.json", ValueError, "tokenizer: .*broken.json is not a Hugging Face tokenizer.json"),
    ("nopad.json", ValueError, r"nopad.json has no padding token: give it one of \['\[PAD\]', '<pad>'"),
    ("sentencepiece", ValueError, "tokenizer must be 'byte', one of .*'bpe'.* a path to a tokenizer.json"),
])
def test_a_bad_tokenizer_is_named_when_the_data_module_is_built(tmp_path, tokenizer, error, match):
    import tokenizers

    (tmp_path / "broken.json").write_text('{"not": "a tokenizer"}')
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "nopad.json"))
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    path = str(tmp_path / tokenizer) if tokenizer.endswith(".json") else tokenizer
    with pytest.raises(error, match=match):
        TextFileDataModule(str(tmp_path / "train.csv"), tokenizer=path)


def test_a_model_whose_vocabulary_or_padding_differs_from_the_data_is_refused(tmp_path):
    import lightning as L

    data = WordNetGlossesDataModule(source="embedded", tokenizer="bpe", vocab_size=500, max_length=32)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="the data has vocab_size=500 but the model was built with vocab_size=257"):
        trainer.fit(TextClassifier(max_length=32, dim=16, depth=1, num_heads=2), datamodule=data)


def test_tokens_beyond_the_models_positions_are_named():
    with pytest.raises(ValueError, match=r"the input has 9 steps \(tokens\), more than max_length=8"):
        MUSETextNet(3, max_length=8, dim=16, depth=1, num_heads=2)(torch.ones(1, 9, dtype=torch.long))


def test_a_trained_vocabulary_is_kept_in_the_checkpoint_and_reused_by_test_and_predict(tmp_path):
    root = tmp_path / "run"
    args = ["--config", str(CONFIGS / "text_quickstart.yaml"), "--data.init_args.tokenizer", "bpe",
            "--data.init_args.vocab_size", "1000", "--model.init_args.depth", "1", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.default_root_dir", str(root)]
    main(["fit", *args])
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["vocab_size"] == 1000  # linked from the data module
    saved = checkpoint["WordNetGlossesDataModule"]["tokenizer"]
    assert json.loads(saved) == json.loads((root / "tokenizer.json").read_text())
    fitted = HFTokenizer.from_str(saved, max_length=128)
    # A new process: the data module takes the checkpoint's vocabulary instead of training one.
    probe = (
        "import json, sys, torch\n"
        "from muse_lightning import WordNetGlossesDataModule\n"
        "dm = WordNetGlossesDataModule(source='embedded', tokenizer='bpe', vocab_size=1000)\n"
        "dm.load_state_dict(torch.load(sys.argv[1], weights_only=True)['WordNetGlossesDataModule'])\n"
        "print(json.dumps([dm.encode(t).tolist() for t in json.loads(sys.argv[2])]))\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-c", probe, str(root / "checkpoints" / "last.ckpt"), json.dumps(SAMPLE)],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    assert json.loads(run.stdout.splitlines()[-1]) == [fitted.encode(t).tolist() for t in SAMPLE]
    for subcommand in ("test", "predict"):
        run = subprocess.run(
            [sys.executable, "-m", "muse_lightning.cli", subcommand, *args, "--trainer.limit_predict_batches", "1",
             "--ckpt_path", str(root / "checkpoints" / "last.ckpt")],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Trained a bpe vocabulary" not in run.stdout + run.stderr  # reused, not trained again


def test_a_vocabulary_too_small_to_hold_padding_and_unknown_is_named_when_the_data_module_is_built():
    with pytest.raises(ValueError, match=r"vocab_size must be at least 3 \(padding, unknown and one token\), got 2"):
        WordNetGlossesDataModule(source="embedded", tokenizer="bpe", vocab_size=2)
