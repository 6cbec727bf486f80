"""MUSE in Hugging Face text encoders: one small random-weight model of each family, and TextClassifier over one."""
import copy
import csv
import random
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the text extra; CI installs it with the dev extra

from conftest import write_tiny_bert

from muse_lightning import MUSEBranch, TextClassifier, swap_attention

CONFIGS = Path(__file__).parents[1] / "configs"

_SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, pad_token_id=0)
FAMILIES = {
    "bert": (transformers.BertConfig(**_SMALL), 2),
    "roberta": (transformers.RobertaConfig(**_SMALL), 2),
    "xlm-roberta": (transformers.XLMRobertaConfig(**_SMALL), 2),
    "camembert": (transformers.CamembertConfig(**_SMALL), 2),
    "electra": (transformers.ElectraConfig(**_SMALL, embedding_size=16), 2),
    "albert": (transformers.AlbertConfig(**_SMALL, embedding_size=16), 1),  # one layer shared by both
    "distilbert": (transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                                 max_position_embeddings=64, pad_token_id=0), 2),
    "deberta-v2": (transformers.DebertaV2Config(**_SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"]), 2),
    "modernbert": (transformers.ModernBertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), 3),  # local and global layers
}


def _model(family):
    config, _ = FAMILIES[family]
    config = copy.deepcopy(config)
    config.num_labels = 3
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def _batch():
    ids = torch.randint(5, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # sample 1: 7 tokens, then padding
    return ids, mask


def _hidden(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_encoder_keeps_its_function_and_never_reads_padding(family):
    model = _model(family)
    ids, mask = _batch()
    ref, ref_hidden = model(input_ids=ids, attention_mask=mask).logits, _hidden(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone in an encoder
        model, names = swap_attention(model, return_names=True)
    branches = [m for m in model.modules() if isinstance(m, MUSEBranch)]
    assert len(names) == len(branches) == FAMILIES[family][1]
    assert {b.conv_layout for b in branches} == {"1d"}
    assert (model(input_ids=ids, attention_mask=mask).logits - ref).abs().max() <= 1e-4  # with padding
    for branch in branches:
        with torch.no_grad():
            for p in branch.parameters():
                p.normal_(0, 0.5)  # a trained branch
    padded = _hidden(model, ids, mask)
    assert (padded - ref_hidden).abs().max() > 1e-3  # the branch is at work
    alone = _hidden(model, ids[1:, :7], mask[1:, :7])  # sample 1 without its padding
    torch.testing.assert_close(padded[1:, :7], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_encoder_trains_every_branch_parameter(family):
    model = swap_attention(_model(family)).train()
    ids, mask = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reached = {n: False for n, _ in model.named_parameters() if ".muse." in n}
    for _ in range(2):  # the projection leaves zero first, then the kernels get a gradient
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss.backward()
        for n, p in model.named_parameters():
            if n in reached and p.grad is not None and p.grad.abs().sum() > 0:
                reached[n] = True
        opt.step()
    assert reached and all(reached.values())


def test_cross_attention_is_left_alone_with_a_warning():
    config = transformers.BertConfig(**_SMALL, is_decoder=True, add_cross_attention=True)
    model = transformers.BertModel(config)
    with pytest.warns(UserWarning, match="crossattention .*cross attention"):
        _, names = swap_attention(model, return_names=True)
    assert names == [f"encoder.layer.{i}.attention" for i in range(2)]


def test_text_classifier_fine_tunes_a_pretrained_encoder_with_muse(tmp_path):
    folder, _ = write_tiny_bert(tmp_path)
    module = TextClassifier(num_classes=3, encoder=str(folder), vocab_size=65, max_length=32)
    assert sum(isinstance(m, MUSEBranch) for m in module.modules()) == 2
    encoder = transformers.BertModel.from_pretrained(folder)
    torch.testing.assert_close(module.model.model.bert.embeddings.word_embeddings.weight,
                               encoder.embeddings.word_embeddings.weight)  # the pretrained weights, loaded
    ids = torch.tensor([[2, 7, 8, 3, 0, 0]])
    assert module({"input_ids": ids}).shape == (1, 3)
    with pytest.raises(ValueError, match="max_length=600 .* 64 positions"):
        TextClassifier(num_classes=3, encoder=str(folder), vocab_size=65, max_length=600)
    with pytest.raises(ValueError, match="vocab_size=500 .* 65 token embeddings"):
        TextClassifier(num_classes=3, encoder=str(folder), vocab_size=500, max_length=32)


def test_encoder_config_fits_then_tests_from_its_checkpoint(tmp_path, monkeypatch):
    from muse_lightning.cli import main
    from muse_lightning.compare import last_metrics
    monkeypatch.chdir(tmp_path)
    folder, words = write_tiny_bert(tmp_path)
    rng = random.Random(0)
    for split, n in (("train", 128), ("test", 32)):
        with open(f"{split}.csv", "w", newline="") as f:
            labels = [rng.randrange(2) for _ in range(n)]
            rows = [(" ".join(rng.choice(words[30 * y:30 * y + 30]) for _ in range(6)), f"c{y}") for y in labels]
            csv.writer(f).writerows([("text", "label"), *rows])
    args = ["--config", str(CONFIGS / "text_encoder.yaml"), "--model.init_args.encoder", str(folder),
            "--model.init_args.pretrained", "false", "--model.init_args.optimizer.init_args.lr", "0.003",
            "--data.init_args.tokenizer", str(folder), "--data.init_args.train_file", "train.csv",
            "--data.init_args.test_file", "test.csv", "--data.init_args.max_length", "16",
            "--trainer.max_epochs", "12"]
    main(["fit", *args])
    best = tmp_path / "runs" / "text_encoder" / "checkpoints" / "best.ckpt"
    hparams = torch.load(best, weights_only=True)["hyper_parameters"]
    assert (hparams["encoder"], hparams["vocab_size"], hparams["max_length"]) == (str(folder), 65, 16)  # linked
    main(["test", *args, "--ckpt_path", str(best), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
          "--trainer.logger.save_dir", "test_logs"])
    assert last_metrics(tmp_path / "test_logs")["test/acc"] > 0.9  # two classes of disjoint words: learnt


def test_encoder_classifier_shows_its_flops(tmp_path):
    from lightning.pytorch.utilities.model_summary import ModelSummary
    folder, _ = write_tiny_bert(tmp_path)
    module = TextClassifier(num_classes=3, encoder=str(folder), vocab_size=65, max_length=32)
    forward = ModelSummary(module).total_flops
    assert forward > 0
    assert module.flops_per_batch > 2 * forward  # counted on a meta twin built from the config
    assert all(p.device.type == "cpu" and p.grad is None for p in module.parameters())
