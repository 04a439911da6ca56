"""RoutingEntropyMonitor, RoutingTemperatureScheduler and TuningCache in real (tiny) Trainer runs."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from test_lightning_metrics import assert_matches, reference
from torch import nn

from condconv_lightning import CondConv2d, convert
from condconv_lightning.callbacks import (
    CondConvConversion,
    RoutingEntropyMonitor,
    RoutingTemperatureScheduler,
    TuningCache,
)
from condconv_lightning.demos import SyntheticImageDataModule
from condconv_lightning.finetune import ImageClassifier


class TinyNet(nn.Module):
    def __init__(self, routing: str = "sigmoid", num_experts: int = 4) -> None:
        super().__init__()
        self.conv1 = CondConv2d(3, 8, 3, padding=1, num_experts=num_experts, routing=routing)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = CondConv2d(8, 8, 3, padding=1, num_experts=num_experts, routing=routing)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_data(train_size: int = 32) -> SyntheticImageDataModule:
    return SyntheticImageDataModule(image_size=8, train_size=train_size, val_size=16, batch_size=8, seed=3)


def frozen_optimizer(params):
    return torch.optim.SGD(params, lr=0.0)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> Trainer:
    options = dict(
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return Trainer(accelerator="cpu", devices=1, callbacks=callbacks, **options)


def csv_rows(t: Trainer) -> list[dict[str, str]]:
    with open(Path(t.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_logged_values_equal_the_routing_of_the_batches_since_the_last_log(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    data = tiny_data()
    monitor = RoutingEntropyMonitor()
    t = trainer(tmp_path, [monitor], max_steps=4, limit_val_batches=1, num_sanity_val_steps=1, log_every_n_steps=2)
    t.fit(ImageClassifier(net, optimizer=frozen_optimizer), data)

    rows = [r for r in csv_rows(t) if r.get("routing/model.conv1/entropy")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # the steps Lightning logs its own values at
    assert all(r.get("train_loss") for r in rows), "routing values share the rows of the loss of the same step"
    assert len([r for r in csv_rows(t) if r.get("train_loss")]) == 2, "no rows of routing values alone"
    batches = [images for images, _ in data.train_dataloader()]  # same seed: same order as in fit
    with torch.no_grad():
        for row, (first, second) in zip(rows, [(0, 1), (2, 3)]):
            expected = reference(net.conv1.route(torch.cat([batches[first], batches[second]])))
            logged = {
                "entropy": torch.tensor(float(row["routing/model.conv1/entropy"])),
                "usage_entropy": torch.tensor(float(row["routing/model.conv1/usage_entropy"])),
                "expert_mean": torch.tensor([float(row[f"routing/model.conv1/expert_{k}"]) for k in range(4)]),
            }
            assert_matches(logged, expected, atol=1e-5)
            layer_means = [float(row[f"routing/model.{n}/entropy"]) for n in ("conv1", "conv2")]
            assert float(row["routing/entropy"]) == pytest.approx(sum(layer_means) / 2, abs=1e-6)
    validation = [r for r in csv_rows(t) if r.get("val_routing/entropy")]
    assert len(validation) == 1, "one validation epoch logged; the sanity check is not"
    assert validation[0].get("val_loss"), "validation routing shares the row of val_loss"
    assert all(not layer._routing_hooks for layer in (net.conv1, net.conv2)), "hooks must be removed in teardown"


def test_under_gradient_accumulation_a_log_covers_its_optimizer_steps_micro_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    data = tiny_data()
    t = trainer(tmp_path, [RoutingEntropyMonitor()], max_steps=2, limit_val_batches=0, accumulate_grad_batches=2)
    t.fit(ImageClassifier(net, optimizer=frozen_optimizer), data)
    rows = [r for r in csv_rows(t) if r.get("routing/model.conv1/entropy")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    batches = [images for images, _ in data.train_dataloader()]
    with torch.no_grad():
        for row, (first, second) in zip(rows, [(0, 1), (2, 3)]):
            expected = reference(net.conv1.route(torch.cat([batches[first], batches[second]])))
            logged = [float(row[f"routing/model.conv1/expert_{k}"]) for k in range(4)]
            torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected["expert_mean"]), atol=1e-5, rtol=0)


def test_under_manual_optimization_routing_shares_the_rows_lightning_logs(tmp_path: Path) -> None:
    class TwoOptimizers(ImageClassifier):  # two optimizer steps per batch: global_step runs twice as fast
        def __init__(self, net: nn.Module) -> None:
            super().__init__(net)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            for optimizer in self.optimizers():
                optimizer.zero_grad()
            self.manual_backward(loss)
            for optimizer in self.optimizers():
                optimizer.step()
            return loss

        def configure_optimizers(self):
            return [torch.optim.SGD(self.model.parameters(), lr=0.0), torch.optim.SGD(self.model.parameters(), lr=0.0)]

    t = trainer(tmp_path, [RoutingEntropyMonitor()], max_steps=8, limit_val_batches=0, log_every_n_steps=2)
    t.fit(TwoOptimizers(TinyNet()), tiny_data())
    loss_steps = [int(r["step"]) for r in csv_rows(t) if r.get("train_loss")]
    routing_steps = [int(r["step"]) for r in csv_rows(t) if r.get("routing/entropy")]
    assert loss_steps == [1, 3], "Lightning logs every second batch"
    assert routing_steps == loss_steps


class StaticNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("options", "warns"),
    [({}, True), ({"routing": "softmax", "router_init": "random", "perturbation": 0.0}, False)],
    ids=["zero-sigmoid", "random-softmax"],
)
def test_routing_that_stays_uniform_warns_once_naming_the_router_init(
    tmp_path: Path, options: dict, warns: bool
) -> None:
    torch.manual_seed(0)
    net = StaticNet()
    convert(net, "*", seed=0, **options)
    monitor = RoutingEntropyMonitor(uniform_steps=3)
    t = trainer(tmp_path, [monitor], max_steps=8, limit_val_batches=0, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(ImageClassifier(net, num_classes=4), tiny_data(train_size=64))
    uniform = [w for w in caught if "has been uniform for 3 steps" in str(w.message)]
    assert len(uniform) == (1 if warns else 0), [str(w.message) for w in caught]
    if warns:
        assert "router_init='random'" in str(uniform[0].message) and "(model.conv1, model.conv2)" in str(
            uniform[0].message
        )
        assert monitor.state_dict()["warned_uniform"] is True


def test_the_uniform_routing_count_survives_a_resume() -> None:
    monitor = RoutingEntropyMonitor()
    monitor.load_state_dict({"uniform_since": {"model.conv1": 40}, "warned_uniform": False})
    assert monitor.state_dict() == {"uniform_since": {"model.conv1": 40}, "warned_uniform": False}
    monitor.load_state_dict({"uniform_since": {"model.conv1": "40"}, "warned_uniform": "yes"})  # not ours: ignored
    assert monitor.state_dict() == {"uniform_since": {"model.conv1": 40}, "warned_uniform": False}


@pytest.mark.parametrize("logger", [True, False])
def test_mean_routing_entropy_is_on_the_progress_bar(tmp_path: Path, logger: bool) -> None:
    t = trainer(tmp_path, [RoutingEntropyMonitor()], max_steps=4, limit_val_batches=1, logger=logger or False)
    t.fit(ImageClassifier(TinyNet(), optimizer=frozen_optimizer), tiny_data())
    shown = t.progress_bar_metrics
    assert 0.0 < shown["routing/entropy"] <= 1.0 and 0.0 < shown["val_routing/entropy"] <= 1.0
    assert not any("/model." in name for name in shown), "per-layer values go to the logger only"
    quiet = trainer(tmp_path / "quiet", [RoutingEntropyMonitor(prog_bar=False)], max_steps=1, limit_val_batches=0)
    quiet.fit(ImageClassifier(TinyNet(), optimizer=frozen_optimizer), tiny_data())
    assert "routing/entropy" not in quiet.progress_bar_metrics


def test_a_failed_run_leaves_no_hook_and_the_monitor_serves_a_new_run(tmp_path: Path) -> None:
    from lightning.pytorch import Callback

    class Fail(Callback):
        def on_train_batch_end(self, *args) -> None:
            raise RuntimeError("stopped")

    net, monitor = TinyNet(), RoutingEntropyMonitor()
    with pytest.raises(RuntimeError, match="stopped"):
        trainer(tmp_path, [monitor, Fail()], max_steps=2).fit(ImageClassifier(net), tiny_data())
    assert not net.conv1._routing_hooks and not net.conv2._routing_hooks
    for run in range(2):  # the same monitor in fresh Trainers: each logs from its first step
        t = trainer(tmp_path / str(run), [monitor], max_steps=1, limit_val_batches=0)
        t.fit(ImageClassifier(net, optimizer=frozen_optimizer), tiny_data())
        assert [int(r["step"]) for r in csv_rows(t) if r.get("routing/entropy")] == [0]


def test_a_layer_that_saw_no_sample_is_left_out_and_the_others_are_logged(tmp_path: Path) -> None:
    class TrainingHead(TinyNet):  # a CondConv head used in training only
        def __init__(self) -> None:
            super().__init__()
            self.aux = CondConv2d(3, 4, 1, num_experts=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            return y + 0 * self.aux(x).mean() if self.training else y

    t = trainer(tmp_path, [RoutingEntropyMonitor()], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(ImageClassifier(TrainingHead(), optimizer=frozen_optimizer), tiny_data())
    (row,) = [r for r in csv_rows(t) if r.get("val_loss")]
    assert row["val_routing/model.conv1/entropy"] and not row.get("val_routing/model.aux/entropy")
    means = [float(row[f"val_routing/model.{n}/entropy"]) for n in ("conv1", "conv2")]
    assert float(row["val_routing/entropy"]) == pytest.approx(sum(means) / 2, abs=1e-6)


def test_a_layer_that_saw_only_empty_batches_is_left_out_not_logged_as_nan(tmp_path: Path) -> None:
    class EmptyAux(TinyNet):  # in validation the head sees only an empty batch (a filtered one, say)
        def __init__(self) -> None:
            super().__init__()
            self.aux = CondConv2d(3, 4, 1, num_experts=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            head = self.aux(x if self.training else x[:0])
            return super().forward(x) + 0 * head.sum()

    t = trainer(tmp_path, [RoutingEntropyMonitor()], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    t.fit(ImageClassifier(EmptyAux(), optimizer=frozen_optimizer), tiny_data())
    (row,) = [r for r in csv_rows(t) if r.get("val_loss")]
    values = {k: float(v) for k, v in row.items() if k.startswith("val_routing/") and v}
    assert "val_routing/model.conv1/entropy" in values and not any(
        k.startswith("val_routing/model.aux/") for k in values
    )
    assert all(math.isfinite(v) for v in values.values())


def test_a_logging_interval_other_than_the_trainers_is_refused(tmp_path: Path) -> None:
    t = trainer(tmp_path, [RoutingEntropyMonitor(logging_interval=2)], max_steps=1, log_every_n_steps=1)
    with pytest.raises(ValueError, match=r"set Trainer\(log_every_n_steps=2\) and leave logging_interval None"):
        t.fit(ImageClassifier(TinyNet()), tiny_data())


def test_tensorboard_and_bf16_mixed(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(
        tmp_path,
        [RoutingEntropyMonitor(logging_interval=1)],
        logger=[tb],
        max_steps=2,
        limit_val_batches=1,
        precision="bf16-mixed",
    )
    t.fit(ImageClassifier(TinyNet()), tiny_data(train_size=16))  # one epoch: validation runs
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {
        "routing/entropy",
        "routing/model.conv2/usage_entropy",
        "routing/model.conv1/expert_3",
        "val_routing/entropy",
    } <= set(tags)
    values = [e.value for tag in tags if "routing" in tag for e in events.Scalars(tag)]
    assert values and all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("with_logger", [True, False], ids=["logger", "no-logger"])
def test_collapse_warns_once_per_collapsed_layer(tmp_path: Path, with_logger: bool) -> None:
    net = TinyNet(routing="softmax")
    with torch.no_grad():
        net.conv2.router.weight.zero_()
        net.conv2.router.bias.copy_(torch.tensor([30.0, 0.0, 0.0, 0.0]))  # every sample -> expert 0
    t = trainer(
        tmp_path,
        [RoutingEntropyMonitor(logging_interval=1, collapse_threshold=0.2)],
        max_steps=3,
        limit_val_batches=0,
        **({} if with_logger else {"logger": False}),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(ImageClassifier(net, optimizer=frozen_optimizer), tiny_data())
    collapse = [str(w.message) for w in caught if "collapsed" in str(w.message)]
    assert len(collapse) == 1 and "model.conv2" in collapse[0], collapse


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logging_interval": -1}, "logging_interval"),
        ({"collapse_threshold": 1.5}, "collapse_threshold"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingEntropyMonitor(**kwargs)


def record_temperatures(net: TinyNet) -> list[float]:
    seen: list[float] = []
    net.conv1.register_routing_hook(lambda layer, r: seen.append(float(layer.temperature)) if layer.training else None)
    return seen


@pytest.mark.parametrize(
    ("scheduler", "trainer_kwargs", "expected"),
    [
        (
            RoutingTemperatureScheduler(8.0, 2.0, duration=3, interval="step"),
            {"max_steps": 5},
            [8.0, 6.0, 4.0, 2.0, 2.0],
        ),
        (RoutingTemperatureScheduler(30.0, 1.0, duration=2), {"max_epochs": 3}, [30.0, 30.0, 15.5, 15.5, 1.0, 1.0]),
    ],
)
def test_temperature_follows_the_schedule(
    tmp_path: Path, scheduler, trainer_kwargs: dict, expected: list[float]
) -> None:
    net = TinyNet(routing="softmax")
    seen = record_temperatures(net)
    t = trainer(tmp_path, [scheduler], limit_val_batches=0, logger=False, **trainer_kwargs)
    t.fit(ImageClassifier(net), tiny_data(train_size=16))
    assert seen == pytest.approx(expected)
    assert float(net.conv2.temperature) == pytest.approx(expected[-1])


def test_cosine_annealing_and_state_dict() -> None:
    scheduler = RoutingTemperatureScheduler(10.0, 2.0, duration=4, annealing="cosine", interval="step")
    for step in range(6):
        fraction = min(step / 4, 1.0)
        assert scheduler.temperature_at(step) == pytest.approx(
            10.0 + (2.0 - 10.0) * (1 - math.cos(math.pi * fraction)) / 2
        )
    scheduler.temperature = 7.5
    restored = RoutingTemperatureScheduler()
    restored.load_state_dict(scheduler.state_dict())
    assert restored.temperature == 7.5


def test_temperature_scheduler_needs_matching_layers(tmp_path: Path) -> None:
    t = trainer(tmp_path, [RoutingTemperatureScheduler()], max_steps=1, limit_val_batches=0, logger=False)
    with pytest.raises(ValueError, match="no CondConv2d with 'softmax' routing"):
        t.fit(ImageClassifier(TinyNet(routing="sigmoid")), tiny_data())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 0.0}, "positive"),
        ({"duration": 0}, "duration"),
        ({"interval": "batch"}, "interval"),
        ({"routing": "relu"}, "routing"),
    ],
)
def test_temperature_scheduler_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingTemperatureScheduler(**kwargs)


def test_a_scheduler_per_routing_in_one_trainer_each_restores_its_own_temperature(tmp_path: Path) -> None:
    net = TinyNet(routing="softmax")
    net.conv2 = CondConv2d(8, 8, 3, padding=1, num_experts=4, routing="sigmoid")
    schedulers = [RoutingTemperatureScheduler(30.0, 1.0, 4, interval="step", routing=r) for r in ("softmax", "sigmoid")]
    t = trainer(tmp_path, schedulers, max_steps=2, limit_val_batches=0)
    t.fit(ImageClassifier(net, optimizer=frozen_optimizer), tiny_data())
    t.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert sorted(states) == sorted(s.state_key for s in schedulers) and len(states) == 2
    assert net.conv1.temperature == net.conv2.temperature == schedulers[0].temperature != 30.0


def test_a_checkpoint_of_the_previous_release_restores_the_temperature_by_the_class_name(tmp_path: Path) -> None:
    """Older checkpoints keep the scheduler's state under its class name; Lightning falls back to it."""
    net = TinyNet(routing="softmax")
    first = RoutingTemperatureScheduler(30.0, 1.0, 4, interval="step")
    t = trainer(tmp_path, [first], max_steps=2, limit_val_batches=0)
    t.fit(ImageClassifier(net, optimizer=frozen_optimizer), tiny_data())
    t.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    checkpoint["callbacks"] = {"RoutingTemperatureScheduler": checkpoint["callbacks"][first.state_key]}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    restored: list[dict] = []
    second = RoutingTemperatureScheduler(30.0, 1.0, 4, interval="step")
    second.load_state_dict = restored.append  # what Lightning hands over
    t = trainer(tmp_path, [second], max_steps=3, limit_val_batches=0)
    t.fit(
        ImageClassifier(TinyNet(routing="softmax"), optimizer=frozen_optimizer),
        tiny_data(),
        ckpt_path=tmp_path / "old.ckpt",
    )
    assert restored == [{"temperature": first.temperature}]


def conversion_trainer(tmp_path: Path, conversion, **kwargs) -> Trainer:
    return trainer(tmp_path, [conversion], logger=False, limit_val_batches=1, **kwargs)


def test_conversion_in_setup_gives_the_optimizer_the_new_parameters(tmp_path: Path) -> None:
    from condconv_lightning.demos import resnet_tiny

    module = ImageClassifier(resnet_tiny(num_classes=4))
    conversion = CondConvConversion(["layer4"], submodule="model", num_experts=2, seed=0, verbose=False)
    t = conversion_trainer(tmp_path, conversion, max_steps=2)
    t.fit(module, tiny_data(train_size=16))
    layers = {name: m for name, m in module.model.named_modules() if isinstance(m, CondConv2d)}
    assert set(layers) == {"layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0"}
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters()}
    assert all(layer.router.weight.abs().sum() > 0 for layer in layers.values()), (
        "routers start at zero and were trained"
    )

    assert conversion.report.input_size == (3, 8, 8), "MACs counted at the data module's input_size"

    # A second setup (validate after fit) converts nothing twice and keeps the trained layers.
    t.validate(module, tiny_data(train_size=16), verbose=False)
    assert {name: m for name, m in module.model.named_modules() if isinstance(m, CondConv2d)} == layers


def test_conversion_reports_a_missing_submodule(tmp_path: Path) -> None:
    t = conversion_trainer(tmp_path, CondConvConversion(["layer4"], submodule="network", verbose=False), max_steps=1)
    with pytest.raises(ValueError, match="no submodule 'network'"):
        t.fit(ImageClassifier(), tiny_data())


def test_tuning_cache_saves_the_choices_and_a_later_run_times_nothing(tmp_path: Path, monkeypatch) -> None:
    import condconv_lightning.functional.autotune as autotune
    from condconv_lightning.functional import clear_tuning_cache, tuning, tuning_cache

    timed: list[list[str]] = []
    inner = autotune._fastest
    monkeypatch.setattr(autotune, "_fastest", lambda candidates, *a: timed.append(candidates) or inner(candidates, *a))
    path = tmp_path / "tuning.json"
    clear_tuning_cache()
    with tuning(True):
        first = TuningCache(path)
        trainer(tmp_path, [first], max_steps=2, limit_val_batches=1).fit(ImageClassifier(TinyNet()), tiny_data())
        saved = tuning_cache()
        assert first.loaded == 0 and timed and path.exists()  # nothing to load the first time; it tuned, and saved
        clear_tuning_cache()  # a new process, as far as the cache knows
        timed.clear()
        later = TuningCache(path)
        trainer(tmp_path, [later], max_steps=2, limit_val_batches=1).fit(ImageClassifier(TinyNet()), tiny_data())
    assert later.loaded == len(saved) and not timed and tuning_cache() == saved
    clear_tuning_cache()


def test_tuning_cache_needs_an_existing_folder_and_a_valid_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist; create it or pass another path"):
        TuningCache(tmp_path / "missing" / "tuning.json")
    (tmp_path / "tuning.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tuning cache"):  # before any step
        trainer(tmp_path, [TuningCache(tmp_path / "tuning.json")], max_steps=1).fit(
            ImageClassifier(TinyNet()), tiny_data()
        )
    assert (tmp_path / "tuning.json").read_text() == "{not json"  # left for the user to fix


def test_tuning_cache_leaves_the_file_alone_when_a_run_fails_before_its_setup(tmp_path: Path) -> None:
    from condconv_lightning.functional import clear_tuning_cache

    class Missing(SyntheticImageDataModule):
        def setup(self, stage: str) -> None:
            raise FileNotFoundError("no images")

    path = tmp_path / "tuning.json"
    path.write_text('{"version": 1, "entries": []}')
    saved = path.read_text()
    clear_tuning_cache()
    with pytest.raises(FileNotFoundError):
        trainer(tmp_path, [TuningCache(path)], max_steps=1).fit(ImageClassifier(TinyNet()), Missing(image_size=8))
    assert path.read_text() == saved


def test_a_tuning_cache_reused_by_a_run_that_fails_before_its_setup_leaves_the_file(tmp_path: Path) -> None:
    class Missing(SyntheticImageDataModule):
        def prepare_data(self) -> None:
            raise FileNotFoundError("no images")

    path = tmp_path / "tuning.json"
    cache = TuningCache(path)
    trainer(tmp_path, [cache], max_steps=1, limit_val_batches=0).fit(ImageClassifier(TinyNet()), tiny_data())
    path.write_text('{"version": 1, "entries": []}')  # another job's choices, say
    with pytest.raises(FileNotFoundError):
        trainer(tmp_path, [cache], max_steps=1).fit(ImageClassifier(TinyNet()), Missing(image_size=8))
    assert path.read_text() == '{"version": 1, "entries": []}'


def test_tuning_cache_saves_what_a_failed_run_tuned(tmp_path: Path) -> None:
    from lightning.pytorch import Callback

    from condconv_lightning.functional import clear_tuning_cache, tuning

    class Fail(Callback):
        def on_train_batch_end(self, *args) -> None:
            raise RuntimeError("stopped")

    clear_tuning_cache()
    with tuning(True), pytest.raises(RuntimeError, match="stopped"):
        trainer(tmp_path, [TuningCache(tmp_path / "tuning.json"), Fail()], max_steps=4).fit(
            ImageClassifier(TinyNet()), tiny_data()
        )
    assert json.loads((tmp_path / "tuning.json").read_text())["entries"]
    clear_tuning_cache()
