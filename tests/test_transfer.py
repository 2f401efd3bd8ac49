"""Transfer learning from a dnnrun checkpoint: reuse, replace, add, freeze, unfreeze."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config
from dnnrun.data.datasets import load
from dnnrun.errors import UserError
from dnnrun.store.rundir import read_jsonl
from dnnrun.training import loop, runtime, transfer

SOURCE = ("model.hidden=[32,16,8]", "norm=batchnorm", "trainer.epochs=2")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A trained source run on the synthetic data (4 classes)."""
    run = tmp_path_factory.mktemp("source")
    loop.run(make_config(*SOURCE), run)
    return run / "checkpoints" / "best.pt"


def _model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _target_model(source: Path, *overrides: str):
    """The model as a run with these transfer settings starts training."""
    cfg = make_config("norm=batchnorm", f"transfer.source={source}", *overrides)
    data = load(cfg.data, torch.device("cpu"))
    state, _ = transfer.load_source(cfg.transfer)
    model, _ = runtime.build_model(cfg, data, transfer.model_config(cfg.model, cfg.transfer, state))
    layers = transfer.reused_layers(cfg.transfer, state)
    return model, transfer.reuse(model, state, layers, str(source)), layers


def test_reused_tensors_equal_the_sources_and_the_rest_is_new(source: Path):
    src = _model(source)
    model, reused, layers = _target_model(source, "transfer.layers=2", "transfer.add=[12]")
    assert layers == [1, 2]
    assert [b.linear.out_features for n, b in model.named_children() if n.startswith("hidden")] == [32, 16, 12]
    state = model.state_dict()
    for name in (
        "hidden1.linear.weight",
        "hidden1.norm.weight",
        "hidden1.norm.running_mean",
        "hidden2.linear.weight",
        "hidden2.norm.running_var",
    ):
        assert torch.equal(state[name], src[name]), name
    assert not any(n.startswith(("hidden3", "output")) for n in reused)
    assert sorted(reused) == sorted(n for n, _ in model.named_parameters() if n.startswith(("hidden1.", "hidden2.")))


def test_replace_gives_one_reused_layer_fresh_weights(source: Path):
    src = _model(source)
    model, reused, layers = _target_model(source, "transfer.layers=3", "transfer.replace=3")
    assert layers == [1, 2] and model.hidden3.linear.out_features == 8
    assert torch.equal(model.hidden2.linear.weight, src["hidden2.linear.weight"])
    assert not torch.equal(model.hidden3.linear.weight, src["hidden3.linear.weight"])


def test_frozen_layers_stay_bit_identical_then_train_with_a_scaled_rate_after_unfreezing(source: Path, tmp_path: Path):
    src = _model(source)
    # Max-norm too: the source's rows are longer than 1, and frozen rows must not be rescaled either.
    settings = (
        "norm=batchnorm",
        f"transfer.source={source}",
        "transfer.freeze=true",
        "transfer.unfreeze_after=2",
        "transfer.unfreeze_lr_factor=0.1",
        "regularizer=[max_norm]",
    )
    run = tmp_path / "target"
    summary = loop.run(
        make_config(*settings, "trainer.epochs=2", "trainer.restore_best=false", "trainer.diagnostics.every=10"), run
    )
    assert summary["transfer"]["reused_layers"] == [1, 2, 3]
    # Frozen layers have no gradient: none is recorded, and none is taken for a vanishing one.
    assert all(
        set(r["layers"]) == {"hidden1", "hidden2", "hidden3", "output"}
        and "grad_norm" not in r["layers"]["hidden1"]
        and r["layers"]["output"]["grad_norm"] > 0
        for r in read_jsonl(run / "diagnostics.jsonl")
    )
    assert not any("gradients vanish" in sentence for sentence in summary["diagnosis"])
    after_frozen = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in src.items():
        if name.startswith("hidden"):  # weights, biases and batch-norm statistics alike
            assert torch.equal(after_frozen["model"][name], tensor), name
    torch.manual_seed(0)  # the seed the run started from: its fresh output layer before training
    initial, _, _ = _target_model(source, *settings[1:])
    assert not torch.equal(after_frozen["model"]["output.weight"], initial.output.weight)  # the new head trained
    groups = after_frozen["optimizer"]["param_groups"]
    assert {g["lr"] for g in groups} == {0.01}

    loop.run(make_config(*settings, "trainer.epochs=4", "trainer.resume=auto"), run)  # epochs 3 and 4: unfrozen
    unfrozen = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not torch.equal(unfrozen["model"]["hidden1.linear.weight"], src["hidden1.linear.weight"])
    assert not torch.equal(unfrozen["model"]["hidden1.norm.running_mean"], src["hidden1.norm.running_mean"])
    lrs = {g["reused"]: g["lr"] for g in unfrozen["optimizer"]["param_groups"]}
    assert lrs == {False: 0.01, True: pytest.approx(0.001)}


def test_a_transferred_run_resumes_and_evaluates_without_its_source(source: Path, tmp_path: Path):
    from dnnrun.inference import evaluate

    copy = tmp_path / "source.pt"
    copy.write_bytes(source.read_bytes())
    settings = ("norm=batchnorm", f"transfer.source={copy}", "transfer.add=[12]")
    loop.run(make_config(*settings, "trainer.epochs=1"), tmp_path / "run")
    copy.unlink()  # the source is gone; the run's own checkpoint holds everything
    summary = loop.run(make_config(*settings, "trainer.epochs=2", "trainer.resume=auto"), tmp_path / "run")
    assert summary["epochs_run"] == 2 and summary["transfer"]["widths"] == [32, 16, 8, 12]
    report = evaluate.run(
        make_config("mode=evaluate", f"evaluate.checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}"),
        tmp_path / "eval",
    )
    tested = json.loads((tmp_path / "run" / "summary.json").read_text())["test"]["test/acc"]  # with best.pt's weights
    assert report["deterministic"]["accuracy"] == pytest.approx(tested)


def test_unfreezing_works_without_batch_norm(tmp_path: Path):
    loop.run(make_config("model.hidden=[16,8]", "trainer.epochs=1"), tmp_path / "plain")
    src = tmp_path / "plain" / "checkpoints" / "last.pt"
    summary = loop.run(
        make_config(
            f"transfer.source={src}",
            "transfer.freeze=true",
            "transfer.unfreeze_after=1",
            "transfer.unfreeze_lr_factor=0.5",
            "trainer.epochs=2",
        ),
        tmp_path / "target",
    )
    last = torch.load(tmp_path / "target" / "checkpoints" / "last.pt", weights_only=True)
    assert not torch.equal(last["model"]["hidden1.linear.weight"], _model(src)["hidden1.linear.weight"])
    assert {g["reused"]: g["lr"] for g in last["optimizer"]["param_groups"]} == {False: 0.01, True: 0.005}
    assert last["callbacks"]["unfreezing"]["unfrozen"] and summary["status"] == "completed"


def test_a_source_with_other_inputs_is_refused_with_what_differs(source: Path, tmp_path: Path):
    cfg = make_config("norm=batchnorm", f"transfer.source={source}", data="digits")
    with pytest.raises(UserError, match="trained on inputs of 32 features; this run's data has 64"):
        loop.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything


def test_a_source_with_another_norm_is_refused(source: Path, tmp_path: Path):
    with pytest.raises(UserError, match="use the same act and norm as the source") as info:
        loop.run(make_config(f"transfer.source={source}"), tmp_path / "run")
    assert "hidden1.norm.weight is in the source but not in this model" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_source_trained_with_another_activation_is_warned_about(source: Path, tmp_path: Path):
    loop.run(make_config("norm=batchnorm", "act=elu", f"transfer.source={source}", "trainer.epochs=1"), tmp_path)
    assert "transfer.source was trained with act=relu; this run uses act=elu" in (tmp_path / "run.log").read_text()


def test_settings_without_a_source_warn(tmp_path: Path):
    summary = loop.run(make_config("transfer.freeze=true", "trainer.epochs=1"), tmp_path)
    assert any("no effect" in w for w in summary["warnings"])


def test_a_missing_source_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="transfer.source: no checkpoint file at /no/such.pt"):
        loop.run(make_config("transfer.source=/no/such.pt"), tmp_path)


@pytest.mark.parametrize("model", ["cnn", "resnet"])
def test_a_conv_nets_lower_blocks_are_reused_and_frozen_as_named_blocks(model: str, tmp_path: Path):
    """transfer.layers counts a conv net's named blocks (conv blocks, residual blocks): a source on
    digits 0..4, a target on 5..9 keeps its first two blocks, frozen, batch-norm statistics too."""
    shape = ["model.channels=[4,8]"] if model == "cnn" else ["model.depth=8", "model.width=4"]
    common = [f"model={model}", *shape, "norm=batchnorm", "trainer.epochs=1", "trainer.limit_batches=4"]
    loop.run(make_config(*common, "data.classes=[0,1,2,3,4]", data="digits"), tmp_path / "source")
    src = _model(tmp_path / "source" / "checkpoints" / "best.pt")
    source = tmp_path / "source" / "checkpoints" / "best.pt"
    summary = loop.run(
        make_config(
            *common,
            "data.classes=[5,6,7,8,9]",
            f"transfer.source={source}",
            "transfer.layers=2",
            "transfer.freeze=true",
            "trainer.restore_best=false",
            data="digits",
        ),
        tmp_path / "target",
    )
    assert summary["transfer"]["reused_layers"] == [1, 2]
    trained = _model(tmp_path / "target" / "checkpoints" / "last.pt")
    reused = [n for n in src if n.startswith(("hidden1.", "hidden2."))]
    assert any(".norm" in n and "running_mean" in n for n in reused) and any("conv" in n for n in reused)
    assert all(torch.equal(trained[n], src[n]) for n in reused)
    above = next(n for n in src if n.startswith("hidden3.") and n.endswith("weight"))  # trained, not frozen
    assert not torch.equal(trained[above], src[above])


def test_a_conv_source_for_a_dense_model_is_refused_with_what_differs(tmp_path: Path):
    loop.run(
        make_config("model=cnn", "model.channels=[4]", "trainer.epochs=1", "trainer.limit_batches=2", data="digits"),
        tmp_path / "source",
    )
    with pytest.raises(UserError, match="transfer.source's hidden1 is a conv layer, this model's a dense one"):
        loop.run(
            make_config(f"transfer.source={tmp_path / 'source' / 'checkpoints' / 'best.pt'}", data="digits"),
            tmp_path / "target",
        )
