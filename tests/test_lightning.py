"""Lightning: the classifiers, the muse-lightning CLI with the shipped configs, resume, DDP, errors."""
import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from conftest import write_rotten_tomatoes

from muse_lightning import (
    FashionMNISTDataModule,
    ImageClassifier,
    MixerOptions,
    SequenceClassifier,
    TextClassifier,
    TextFileDataModule,
    WarmupCosineLR,
    WordNetGlossesDataModule,
)
from muse_lightning.callbacks import peak_flops
from muse_lightning.cli import main
from muse_lightning.compare import last_metrics
from muse_lightning.text import MUSETextNet

CONFIGS = Path(__file__).parents[1] / "configs"
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "2"]
SMALL_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}


# The shipped configs by name, each attention twin an overlay given after its base.
SHIPPED = [["quickstart"], ["text_quickstart"], ["quickstart", "quickstart_attention"],
           ["text_quickstart", "text_quickstart_attention"]]


def _configs(names):
    return [arg for name in names for arg in ("--config", name)]


@pytest.mark.parametrize("names", SHIPPED, ids=lambda names: names[-1])
def test_shipped_config_fits_tests_and_predicts_under_its_default_root_dir(tmp_path, monkeypatch, names):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    args = [*_configs(names), *QUICK, "--trainer.default_root_dir", str(root)]  # by name, from an empty folder
    main(["fit", *args])
    ckpt = root / "checkpoints" / "best.ckpt"
    assert ckpt.is_file() and (root / "checkpoints" / "last.ckpt").is_file()
    main(["test", *args, "--ckpt_path", str(ckpt)])
    metrics = last_metrics(root / "logs")
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "test/f1_macro" in metrics and "test/acc_top5" in metrics
    main(["predict", *args, "--trainer.limit_predict_batches", "2", "--ckpt_path", str(ckpt)])
    with open(root / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    name = names[-1]
    batch = 128 if name.startswith("quickstart") else 64
    assert [int(r["index"]) for r in rows] == list(range(2 * batch))
    assert all(0.0 < float(r["probability"]) <= 1.0 and r["prediction"] and r["label"] for r in rows)
    assert ("text" in rows[0]) == name.startswith("text")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing written outside default_root_dir
    # One version folder a run (fit, test, predict), holding both loggers' files.
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["version_0", "version_1", "version_2"]
    fit_logs = root / "logs" / "version_0"
    assert (fit_logs / "metrics.csv").is_file() and (fit_logs / "config.yaml").is_file()
    assert list(fit_logs.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("overlay", ["gpu.yaml", "ddp.yaml", "multinode.yaml", "fsdp.yaml", "compiled.yaml", "throughput.yaml"])
def test_overlay_configs_parse_on_top_of_the_quickstart(overlay, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / overlay), "--print_config"])
    assert exit_info.value.code == 0
    assert "muse_lightning.ImageClassifier" in capsys.readouterr().out


def test_compiled_run_from_config_trains(tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "compiled.yaml"), *QUICK,
          "--trainer.limit_val_batches", "0", "--model.init_args.model_kwargs", str(SMALL_VIT)])
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt").is_file()


class _StartStep(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = trainer.global_step


def test_resume_from_checkpoint_continues_at_the_right_step(tmp_path):
    def trainer(max_steps, *callbacks):
        return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                         limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks))

    data = FashionMNISTDataModule(source="embedded", batch_size=32)
    first = trainer(6)
    first.fit(ImageClassifier(model_kwargs=SMALL_VIT), datamodule=data)
    ckpt = tmp_path / "six.ckpt"
    first.save_checkpoint(ckpt)
    lr_at_six = first.optimizers[0].param_groups[0]["lr"]
    start = _StartStep()
    second = trainer(10, start)
    second.fit(ImageClassifier(model_kwargs=SMALL_VIT), datamodule=data, ckpt_path=ckpt)
    assert start.start == 6 and second.global_step == 10
    assert second.lr_scheduler_configs[0].scheduler.last_epoch == 10  # the schedule went on, not restarted
    assert lr_at_six > 0


def test_ddp_synced_metrics_equal_a_single_process_run(tmp_path, monkeypatch):
    """validate on 2 CPU processes (strategy=ddp) gives the single-process metrics on the same data."""
    monkeypatch.chdir(tmp_path)  # a checkpoint made by the CLI, as users make them
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "0", "--model.init_args.model_kwargs", str(SMALL_VIT)])
    ckpt = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        logs = tmp_path / f"logs{devices}"
        cmd = [sys.executable, "-m", "muse_lightning.cli", "validate", "--config", str(CONFIGS / "quickstart.yaml"),
               "--model.init_args.model_kwargs", str(SMALL_VIT), "--trainer.devices", str(devices),
               "--trainer.strategy", strategy, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(logs), "--ckpt_path", str(ckpt)]
        subprocess.run(cmd, check=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
        results[devices] = last_metrics(logs)
    for key in ("val/acc", "val/acc_top5", "val/f1_macro"):
        assert results[2][key] == pytest.approx(results[1][key], abs=1e-6), key
    assert results[2]["val/loss"] == pytest.approx(results[1]["val/loss"], rel=1e-5)


FREEZER = """
import os, signal
import lightning as L

class FreezeAt(L.Callback):
    \"\"\"SIGSTOP rank 1 when training reaches ``step``: a peer that stops answering without dying.\"\"\"
    def __init__(self, step: int):
        self.step = step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGSTOP)
"""


@pytest.mark.parametrize("overlay", ["ddp.yaml", "multinode.yaml"])
def test_a_frozen_ddp_peer_ends_the_job_at_the_configured_timeout(tmp_path, overlay):
    """The DDP overlays' process-group timeout, shortened to 30 s, on 2 CPU processes: rank 1 stops (SIGSTOP)
    at step 3 and rank 0 exits with an error naming the wait, long before PyTorch's default 30 minutes."""
    (tmp_path / "freezer.py").write_text(FREEZER)
    cmd = [sys.executable, "-m", "muse_lightning.cli", "fit", "--config", str(CONFIGS / "quickstart.yaml"),
           "--config", str(CONFIGS / overlay), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.num_nodes", "1", "--trainer.precision", "32-true", "--trainer.strategy.init_args.timeout", "0:00:30",
           "--model.init_args.model_kwargs", str(SMALL_VIT), "--trainer.max_steps", "20", "--trainer.limit_val_batches", "0",
           "--trainer.callbacks+=freezer.FreezeAt", "--trainer.callbacks.step", "3"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "job.log"  # a file, not a pipe: the frozen rank holds its end open
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = job.wait(timeout=400)  # TimeoutExpired: the job hangs on
        finally:  # the frozen rank and anything else left of the job
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    assert returncode != 0
    assert re.search(r"timed out|timeout", output, flags=re.I), output[-3000:]
    assert "30000ms" in output or "0:00:30" in output, output[-3000:]


def test_image_classifier_learns_fashion_mnist(tmp_path):
    L.seed_everything(0)
    data = FashionMNISTDataModule(source="embedded", batch_size=64)
    model = ImageClassifier(model_kwargs={"embed_dim": 96, "depth": 2, "num_heads": 3},
                            optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.05))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=150, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    assert result["test/acc"] > 0.5  # chance is 0.1


def test_text_classifier_learns_wordnet_supersenses(tmp_path):
    L.seed_everything(0)
    data = WordNetGlossesDataModule(source="embedded", batch_size=64, max_length=96)
    model = TextClassifier(max_length=96, dim=96, depth=2, num_heads=4,
                           optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=120, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    (result,) = trainer.test(model, datamodule=data, verbose=False)
    assert result["test/acc"] > 0.2  # the most frequent class is 12% of the glosses


@pytest.mark.parametrize("ngram_buckets", [0, 4096])
def test_text_net_pools_real_tokens_only(ngram_buckets):
    net = MUSETextNet(5, max_length=16, dim=32, depth=2, num_heads=4, ngram_buckets=ngram_buckets).eval()
    if ngram_buckets:
        torch.nn.init.normal_(net.ngrams.weight)  # a trained table: padding n-grams must still count for nothing
    ids = torch.randint(1, 257, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    batch = torch.cat([padded, torch.randint(1, 257, (1, 16))])
    torch.testing.assert_close(net(batch)[0], net(ids)[0], atol=1e-5, rtol=1e-5)


def test_ngram_path_starts_silent_and_learns_its_own_ngrams():
    net = MUSETextNet(2, vocab_size=50, max_length=8, dim=16, depth=1, num_heads=2, ngram_buckets=500)
    ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    encoder_only = MUSETextNet(2, vocab_size=50, max_length=8, dim=16, depth=1, num_heads=2)
    encoder_only.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("ngrams.")})
    torch.testing.assert_close(net.eval()(ids), encoder_only.eval()(ids))  # a zero table adds nothing
    net.train()(ids)[:, 0].sum().backward()
    rows = net.ngrams.weight.grad.abs().sum(1).nonzero().flatten().tolist()
    pairs = [50 + (a * 50 + b) % 450 for a, b in ((3, 4), (4, 5), (6, 7))]
    assert rows == sorted([3, 4, 5, 6, 7, *pairs])  # each real token and pair, none with padding
    with pytest.raises(ValueError, match="ngram_buckets must exceed vocab_size=50"):
        MUSETextNet(2, vocab_size=50, ngram_buckets=50)


def test_ngram_table_trains_at_its_own_learning_rate_without_decay(tmp_path):
    rows = "".join(f"{'good fine film' if i % 2 else 'bad dull film'} {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    data = TextFileDataModule(str(tmp_path / "train.csv"), batch_size=8, max_length=16)
    model = TextClassifier(num_classes=2, max_length=16, dim=16, depth=1, num_heads=2, ngram_buckets=1024,
                           ngram_lr=0.05, optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05),
                           scheduler=partial(WarmupCosineLR, warmup_fraction=0.0))
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    before = model.model.ngrams.weight.detach().clone()
    trainer.fit(model, datamodule=data)
    groups = trainer.optimizers[0].param_groups
    own = [g for g in groups if any(p is model.model.ngrams.weight for p in g["params"])]
    assert len(own) == 1 and own[0]["params"] == [model.model.ngrams.weight] and own[0]["weight_decay"] == 0.0
    assert own[0]["initial_lr"] == 0.05 and all(g["initial_lr"] == 1e-3 for g in groups if g is not own[0])
    assert not torch.equal(model.model.ngrams.weight, before)
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}  # the optimizer's own
    assert id(model.model.embed.weight) in decayed and id(model.model.head.bias) not in decayed


@pytest.mark.parametrize(("scheduler", "length"), [
    (WarmupCosineLR, 12),
    (partial(WarmupCosineLR, total_steps=30, warmup_fraction=0.25), 30),  # given: kept
    (partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01), 12),
], ids=["warmup-cosine", "warmup-cosine-given", "one-cycle"])
def test_a_schedule_that_takes_total_steps_gets_the_runs_optimizer_steps(tmp_path, scheduler, length):
    data = FashionMNISTDataModule(source="embedded", batch_size=32)
    model = ImageClassifier(model_kwargs=SMALL_VIT, scheduler=scheduler)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=0, logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    schedule = trainer.lr_scheduler_configs[0]
    assert schedule.interval == "step" and schedule.scheduler.total_steps == length and schedule.scheduler.last_epoch == 12


def test_warmup_cosine_rises_linearly_then_decays_to_its_floor():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineLR(optimizer, total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3]) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.01, abs=1e-3)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        WarmupCosineLR(optimizer)


def test_predict_returns_probabilities_and_classes(tmp_path):
    data = FashionMNISTDataModule(source="embedded", batch_size=50)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_predict_batches=2,
                        default_root_dir=tmp_path)
    (first, _) = trainer.predict(ImageClassifier(model_kwargs=SMALL_VIT), datamodule=data)
    assert first["probs"].shape == (50, 10) and torch.allclose(first["probs"].sum(-1), torch.ones(50))
    assert first["preds"].shape == (50,)


def test_mixer_options_reach_a_muse_vits_blocks_and_a_swapped_models_attention():
    muse = ImageClassifier(model_kwargs=SMALL_VIT, mixer=MixerOptions(kernel_sizes=(3, 5), conv_proj="shared"))
    assert {(b.attn.kernel_sizes, b.attn.conv_proj_mode, b.attn.conv_layout) for b in muse.model.blocks} == {
        ((3, 5), "shared", "2d")}  # the options given, the registered models' 2-D layout where none is given
    swapped = ImageClassifier(model_name="vit_tiny_patch16_224", num_classes=2, swap_attention=True, img_size=32,
                              model_kwargs={"depth": 1}, mixer={"kernel_sizes": [3], "conv_layout": "1d"})
    assert (swapped.model.blocks[0].attn.muse.kernel_sizes, swapped.model.blocks[0].attn.muse.conv_layout) == ((3,), "1d")
    with pytest.raises(ValueError, match="mixer is for muse_vit_\\* models or swap_attention=True; resnet18 has no MUSE"):
        ImageClassifier(model_name="resnet18", mixer=MixerOptions(kernel_sizes=(3,)))
    with pytest.raises(ValueError, match="give MUSE's options as mixer, not in model_kwargs"):
        ImageClassifier(model_kwargs={**SMALL_VIT, "mixer": {"kernel_sizes": [3]}})
    with pytest.raises(TypeError, match=r"give \['kernel_sizes'\] as mixer=MixerOptions"):
        timm.create_model("muse_vit_tiny_patch4_28", kernel_sizes=(3,))


@pytest.mark.parametrize("make", [
    lambda: ImageClassifier(model_kwargs=SMALL_VIT, mixer=MixerOptions(kernel_sizes=(3,), conv_proj="per_kernel")),
    lambda: SequenceClassifier(in_features=2, max_length=16, dim=32, depth=1, mixer=MixerOptions(conv_type="dynamic")),
], ids=["image", "sequence"])
def test_a_checkpoint_keeps_the_mixer_options_as_plain_values_and_rebuilds_the_same_model(tmp_path, make):
    module = make()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_steps=0, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)  # as the CLI reads --ckpt_path
    assert saved["hyper_parameters"]["mixer"] == module.hparams.mixer.as_dict()
    again = type(module).load_from_checkpoint(tmp_path / "m.ckpt")
    for mine, theirs in zip(module.state_dict().items(), again.state_dict().items()):
        assert mine[0] == theirs[0]
        torch.testing.assert_close(mine[1], theirs[1])


def test_unknown_model_name_fails_early_with_suggestions():
    with pytest.raises(ValueError, match=r"unknown model_name 'muse_vit_tiny_patch4_29'; close matches: \[.*'muse_vit_tiny_patch4_28'"):
        ImageClassifier(model_name="muse_vit_tiny_patch4_29")


def test_cli_fails_early_on_missing_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # LightningCLI reports it while building the data module, before anything runs.
    with pytest.raises((FileNotFoundError, ValueError), match="Fashion-MNIST directory .* not found"):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--data.init_args.source", "system",
              "--data.init_args.root", str(tmp_path / "nowhere")])
    assert not (tmp_path / "runs").exists()


def test_mismatched_class_counts_fail_early(tmp_path):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="the data has 10 classes but the model was built with num_classes=45"):
        trainer.fit(ImageClassifier(num_classes=45, model_kwargs=SMALL_VIT), datamodule=FashionMNISTDataModule())
    ckpt = tmp_path / "ten.ckpt"
    fit = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=0,
                    default_root_dir=tmp_path, enable_checkpointing=False)
    fit.fit(ImageClassifier(model_kwargs=SMALL_VIT), datamodule=FashionMNISTDataModule(source="embedded"))
    fit.save_checkpoint(ckpt)
    match = r"the checkpoint does not fit this model \(num_classes=45 here.*model.head.weight: \(10, 64\) in the checkpoint"
    with pytest.raises(ValueError, match=match):
        ImageClassifier.load_from_checkpoint(ckpt, num_classes=45)
    with pytest.raises(ValueError, match=match):
        images = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 45, (8,)))
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path).test(
            ImageClassifier(num_classes=45, model_kwargs=SMALL_VIT), ckpt_path=ckpt,
                 dataloaders=torch.utils.data.DataLoader(images, batch_size=8))


@pytest.mark.parametrize(("base", "num_classes"), [("quickstart", 10), ("text_quickstart", 45), ("reviews", 2)])
def test_attention_twin_overlays_match_the_muse_configs_within_two_percent_of_parameters(base, num_classes, capsys):
    import importlib

    import yaml

    def config(names):
        with pytest.raises(SystemExit):
            main(["fit", *_configs(names), "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    def build(model):
        module, name = model["class_path"].rsplit(".", 1)
        network = {k: v for k, v in model["init_args"].items() if k not in ("num_classes", "optimizer", "scheduler")}
        return getattr(importlib.import_module(module), name)(num_classes=num_classes, **network)

    muse, twin = config([base]), config([base, f"{base}_attention"])
    assert twin["trainer"]["default_root_dir"] == f"runs/{base}_attention"  # the twin's runs beside, not over, MUSE's
    assert {k: v for k, v in twin.items() if k not in ("model", "trainer")} == {
        k: v for k, v in muse.items() if k not in ("model", "trainer")}  # the same data and seed
    muse, attention = muse["model"], twin["model"]
    with_conv, attention_only = build(muse), build(attention)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(attention_only) / count(with_conv) - 1) < 0.02
    assert all(m.conv is None for m in attention_only.modules() if hasattr(m, "conv_proj_mode"))
    assert all(m.conv is not None for m in with_conv.modules() if hasattr(m, "conv_proj_mode"))


@pytest.mark.parametrize("names", [["reviews"], ["reviews", "reviews_attention"]], ids=lambda names: names[-1])
def test_reviews_configs_fit_then_test_on_a_corpus_file_and_learn_it(tmp_path, names):
    path = write_rotten_tomatoes(tmp_path / "rt.csv.bz2", per_class=200)
    root = tmp_path / "run"
    args = [*_configs(names), "--data.init_args.path", str(path), "--data.init_args.vocab_size", "200",
            "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(root)]
    main(["fit", *args])
    main(["test", *args, "--ckpt_path", str(root / "checkpoints" / "best.ckpt")])
    assert last_metrics(root / "logs")["test/acc"] >= 0.9  # fresh and rotten snippets share no adjective
    assert (root / "tokenizer.json").is_file()


def test_text_files_recipe_fits_then_predicts_unlabelled_text_beside_its_texts(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    words = {"pos": ["good", "great", "lovely"], "neg": ["bad", "awful", "dull"]}
    rows = [(f"a {words[label][i % 3]} film, {i}", label) for i in range(60) for label in words]
    with open("reviews.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    Path("new.csv").write_text("text\nwhat a lovely film\nso dull\n")
    args = ["--config", str(CONFIGS / "text_files.yaml"), "--data.train_file", "reviews.csv", "--trainer.max_epochs", "1"]
    main(["fit", *args])
    best = tmp_path / "runs" / "text_files" / "checkpoints" / "best.ckpt"
    # The model's tables follow the data's tokenizer and max_length (Unigram, 4000, 128 in the recipe): linked, not repeated.
    hparams = torch.load(best, weights_only=True)["hyper_parameters"]
    assert (hparams["max_length"], hparams["vocab_size"], hparams["pad_id"]) == (128, 4000, 0)
    assert (tmp_path / "runs" / "text_files" / "tokenizer.json").is_file()
    with caplog.at_level("INFO"):
        main(["predict", *args, "--data.predict_file", "new.csv", "--ckpt_path", str(best)])
    written = tmp_path / "runs" / "text_files" / "predictions.csv"
    assert f"written to {written.relative_to(tmp_path)}" in caplog.text
    with open(written) as f:
        predicted = list(csv.DictReader(f))
    assert list(predicted[0]) == ["index", "text", "prediction", "probability"]  # no label column: the file has none
    assert [r["text"] for r in predicted] == ["what a lovely film", "so dull"]
    assert all(r["prediction"] in words and 0.5 <= float(r["probability"]) <= 1.0 for r in predicted)



@pytest.mark.parametrize("make", [
    lambda: ImageClassifier(model_kwargs=SMALL_VIT),
    lambda: TextClassifier(max_length=32, dim=32, depth=1, num_heads=2),
    lambda: TextClassifier(max_length=32, dim=32, depth=1, num_heads=2, mixer=MixerOptions(conv_type="dynamic")),
    lambda: SequenceClassifier(in_features=3, max_length=20, dim=32, depth=1, num_heads=2),
], ids=["image", "text", "text-dynamic", "sequence"])
def test_modules_show_their_flops_and_count_a_training_batchs(make):
    from lightning.pytorch.utilities.model_summary import ModelSummary

    module = make()
    forward = ModelSummary(module).total_flops  # from example_input_array: one sample
    assert forward > 0
    assert module.flops_per_batch > 2 * forward  # forward and backward, batch of 1 without a trainer
    assert all(p.device.type == "cpu" and p.grad is None for p in module.parameters())  # counted on a meta twin


def test_throughput_overlay_logs_samples_flops_per_second_and_mfu_against_the_peak_given(tmp_path):
    # Rates are rolling averages over 50 batches, logged every 20 steps: the first at step 60. Lightning has no peak
    # FLOP/s for a CPU, so MFU is logged only against the one given.
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(CONFIGS / "throughput.yaml"),
          "--model.init_args.model_kwargs", str(SMALL_VIT), "--trainer.max_steps", "60", "--trainer.limit_val_batches", "1",
          "--trainer.callbacks.available_flops", "2e12", "--trainer.default_root_dir", str(tmp_path)])
    metrics = last_metrics(tmp_path / "logs")
    assert metrics["train/device/samples_per_sec"] > 0 and metrics["train/device/flops_per_sec"] > 0
    assert metrics["train/device/mfu"] == pytest.approx(metrics["train/device/flops_per_sec"] / 2e12)


@pytest.mark.parametrize(("name", "precision", "matmul", "flops"), [
    ("NVIDIA H200", "bf16-mixed", "highest", 989.5e12),
    ("NVIDIA H200", "16-mixed", "highest", 989.5e12),
    ("NVIDIA H200", "32-true", "high", 494.5e12),  # TF32 matrix products
    ("NVIDIA H200", "32-true", "highest", 67e12),
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", "highest", None),  # Lightning's own figure stands
    ("NVIDIA H200 NVL", "bf16-mixed", "highest", None),
])
def test_peak_flops_gives_the_h200_its_dense_figures_and_leaves_other_gpus_to_lightning(
        monkeypatch, name, precision, matmul, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul)
    try:
        assert peak_flops(torch.device("cuda", 0), precision) == flops
    finally:
        torch.set_float32_matmul_precision(previous)
    assert peak_flops(torch.device("cpu"), precision) is None


def test_a_timm_model_built_for_other_images_fits_image_folders_at_their_size(tmp_path):
    """A timm ViT made for 64 px (its pretrained config says 224) with MUSE swapped in: the model summary at
    the start of fit runs example_input_array at the model's own size, and training runs on 64 px folders."""
    from PIL import Image

    from muse_lightning import ImageFolderDataModule

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((70, 70, 3), 60 * i, dtype=np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    model = ImageClassifier(model_name="vit_tiny_patch16_224", num_classes=2, swap_attention=True,
                            model_kwargs={"img_size": 64, "depth": 1})
    assert model.example_input_array[0].shape == (1, 3, 64, 64)
    data = ImageFolderDataModule(str(tmp_path / "train"), img_size=64, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 1


def _stripes(folder: Path, per_class: int, size: int, seed: int) -> None:
    """Two classes of noisy stripes, vertical and horizontal, as png class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, axis in (("horizontal", 0), ("vertical", 1)):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            period = rng.integers(4, 9)
            wave = 127 + 120 * np.sign(np.sin(2 * np.pi * (np.arange(size) + rng.integers(period)) / period))
            image = np.repeat(np.expand_dims(wave, 1 - axis), size, axis=1 - axis)
            image = np.clip(image + rng.normal(0, 30, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(np.stack([image] * 3, -1)).save(folder / cls / f"{i}.png")


def test_image_folder_config_fits_and_tests_at_the_images_resolution(tmp_path, monkeypatch):
    """configs/image_folders.yaml on 48 px folders: vit_tiny_patch16_224 with MUSE swapped in is built for 48 px
    (the images' size, linked from the data), trains, and tests from best.ckpt above chance."""
    monkeypatch.chdir(tmp_path)
    _stripes(tmp_path / "train", 24, 48, seed=0)
    _stripes(tmp_path / "test", 16, 48, seed=1)
    args = ["--config", "image_folders", "--data.train_dir", "train", "--data.test_dir", "test",
            "--model.model_kwargs", '{"depth": 2, "patch_size": 8}', "--trainer.max_epochs", "2",
            "--data.min_train_batches", "20", "--data.batch_size", "16"]
    main(["fit", *args])
    ckpt = tmp_path / "runs" / "image_folders" / "checkpoints" / "best.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["img_size"] == 48 and hparams["num_classes"] == 2
    main(["test", *args, "--ckpt_path", str(ckpt)])
    metrics = last_metrics(tmp_path / "runs" / "image_folders" / "logs")
    assert metrics["test/acc"] >= 0.75, metrics


def test_image_classifier_builds_fixed_size_models_for_the_datas_images_and_leaves_cnns_as_they_are():
    vit = ImageClassifier(model_name="vit_tiny_patch16_224", num_classes=2, img_size=48, model_kwargs={"depth": 1})
    assert vit.model.patch_embed.img_size == (48, 48) and vit.example_input_array[0].shape == (1, 3, 48, 48)
    muse = ImageClassifier(model_name="muse_vit_tiny_patch4_28", num_classes=2, img_size=36, model_kwargs={"depth": 1})
    assert muse.model.patch_embed.grid_size == (9, 9)
    cnn = ImageClassifier(model_name="resnet18", num_classes=2, img_size=40)  # takes any size: built as it is
    assert cnn.example_input_array[0].shape == (1, 3, 40, 40) and cnn(cnn.example_input_array[0]).shape == (1, 2)
    with pytest.raises(ValueError, match=r"img_size=48 \(the data's\) and model_kwargs' img_size=64 differ"):
        ImageClassifier(model_name="vit_tiny_patch16_224", num_classes=2, img_size=48, model_kwargs={"img_size": 64})
