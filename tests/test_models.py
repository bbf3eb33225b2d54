"""The models: the CIFAR ResNets, the cnn on any image size, the training precision, and the
user's own model (`--model MODULE:CALLABLE`, factories in tests/user_models.py) through
training, influence, checkpoints and every refusal."""

import hashlib
import re

import numpy as np
import pytest
import torch
from test_influence import closed_form

from flows.cli import main
from pruning_core import influence as inf
from pruning_core import training
from pruning_core.artifacts import save_checkpoint
from pruning_core.data import Dataset, load_dataset
from pruning_core.errors import BadInputError
from pruning_core.evaluation import retrain_key
from pruning_core.models import BasicBlock, CifarResNet, FactoryModel, SmallCNN, build_model
from pruning_core.recipe import CIFAR_RESNETS, TrainArgs
from pruning_core.scopes import ScopedLoss, scope_parameter_names
from pruning_core.training import (
    accuracy,
    load_model,
    low_res_size,
    predict_logits,
    train,
    train_network,
    training_precision,
)
from tests.conftest import copy_cifar_slice
from tests.user_models import SmallNet

USER = "tests.user_models"


@pytest.fixture(scope="module")
def cifar_npz(tmp_path_factory) -> str:
    """20 training and 5 test images per class of CIFAR-10, decoded by the `folder:` source, as an
    `npz:` file."""
    ds = load_dataset(f"folder:{copy_cifar_slice(tmp_path_factory.mktemp('cifar'), 20, 5)}")
    path = tmp_path_factory.mktemp("cifar") / "cifar-slice.npz"
    np.savez(path, x=ds.x, y=ds.y, x_test=ds.x_test, y_test=ds.y_test)
    return str(path)


def small(ds: Dataset, n: int) -> Dataset:
    return Dataset("small", ds.x[:n], ds.y[:n], np.arange(n), ds.x_test, ds.y_test, ds.n_classes, {"source": "npz:s"})


# --- the CIFAR ResNets ------------------------------------------------------------------------

@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_cifar_resnets_have_6n_plus_2_layers_and_the_paper_s_sizes(name):
    """6n+2 weighted layers (convolutions and fc), 64 features from global pooling, and the
    parameter counts of the paper's table 6 (resnet20: 0.27 M; resnet56: 0.85 M): no parameter
    on the shortcuts (option A)."""
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10)
    depth = int(name.removeprefix("resnet"))
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == depth and layers[-1] is model.fc
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    assert model.features(x).shape == (3, 64) and model(x).shape == (3, 10)
    assert torch.equal(model(x), model.fc(model.features(x)))
    count = sum(p.numel() for p in model.parameters())
    assert count == {"resnet8": 75_290, "resnet14": 172_506, "resnet20": 269_722, "resnet32": 464_154,
                     "resnet44": 658_586, "resnet56": 853_018}[name]


@pytest.mark.parametrize("shape", [(1, 5, 7), (4, 64, 48), (3, 1, 1)])
def test_cifar_resnets_take_any_image_size_and_channel_count(shape):
    model = build_model("resnet8", shape, 7).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_the_option_a_shortcut_is_the_input_subsampled_and_padded_with_zero_channels():
    """With its residual branch silenced (conv2 zero, bn2's shift zero), a widening block
    returns relu of its shortcut: the input's every other row and column, then 16 zero channels."""
    block = BasicBlock(16, 32, stride=2).eval()
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.rand(2, 16, 9, 9)  # odd: ⌈9/2⌉ = 5, as the strided convolution gives
    out = block(x)
    assert out.shape == (2, 32, 5, 5)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2]) and not out[:, 16:].any()
    assert sum(p.numel() for p in block.parameters()) == 16 * 32 * 9 + 32 * 32 * 9 + 4 * 32


@pytest.mark.parametrize("name", ["resnet10", "resnet26", "resnet110"])
def test_a_resnet_depth_that_is_not_built_in_is_refused_naming_those_that_are(name, tmp_path, capsys):
    with pytest.raises(BadInputError, match=f"^model {name}: a CIFAR ResNet has 6n\\+2 layers, and those built in are "
                                            "resnet8, resnet14, resnet20, resnet32, resnet44, resnet56"):
        TrainArgs(model=name)
    with pytest.raises(BadInputError, match="6n\\+2 layers"):
        CifarResNet(10, 3, 10)
    assert main(["run", "--model", name, "--prune-ratio", "0.4", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dataset-prune: error: --model '{name}': Input should be linear, cnn, resnet18, resnet8, ")
    assert err.count("\n") == 1 and "a CIFAR ResNet has 6n+2 layers" in err and not (tmp_path / "runs").exists()


def test_the_cifar_resnets_default_recipe():
    """About ten minutes of training on 2 CPU cores each (docs/method.md#cifar-resnet-recipe), augmented,
    the first half of the epochs on ¾-size images."""
    assert {name: TrainArgs(model=name).epochs for name in CIFAR_RESNETS} == {
        "resnet8": 20, "resnet14": 16, "resnet20": 12, "resnet32": 10, "resnet44": 10, "resnet56": 10}
    assert {name: TrainArgs(model=name).low_res_epochs for name in CIFAR_RESNETS} == {
        "resnet8": 10, "resnet14": 8, "resnet20": 6, "resnet32": 5, "resnet44": 5, "resnet56": 5}
    assert TrainArgs(model="resnet20", epochs=5).low_res_epochs == 2
    assert TrainArgs(model="resnet20", low_res_epochs=0).low_res_epochs == 0
    assert TrainArgs(model="cnn").low_res_epochs == TrainArgs(model="resnet18").low_res_epochs == 0
    assert all(TrainArgs(model=name).augment for name in CIFAR_RESNETS)
    assert not TrainArgs(model="cnn").augment and not TrainArgs(model="resnet18").augment
    assert TrainArgs(model="resnet18").epochs == 30 and TrainArgs(model="cnn").epochs == 4
    # the peak learning rate: the ResNets' own, the other models' as their results were measured
    assert {TrainArgs(model=name).lr for name in CIFAR_RESNETS} == {0.2}
    assert TrainArgs(model="cnn").lr == TrainArgs(model="resnet18").lr == TrainArgs(model="tests.m:f").lr == 0.05
    assert TrainArgs(model="resnet20", lr=0.1).lr == 0.1


# --- the cnn on any size ----------------------------------------------------------------------

def test_the_28x28_cnn_is_the_one_before_any_size_was_allowed():
    """Same layers, shapes and seeded initialisation (the digest below, from the code before
    the cnn took other sizes), so Fashion-MNIST results do not change."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [
        ("conv1.weight", (16, 1, 5, 5)), ("conv1.bias", (16,)), ("conv2.weight", (32, 16, 5, 5)), ("conv2.bias", (32,)),
        ("fc1.weight", (128, 1568)), ("fc1.bias", (128,)), ("fc.weight", (10, 128)), ("fc.bias", (10,))]
    digest = hashlib.sha256()
    for k, v in model.state_dict().items():
        digest.update(k.encode() + str(tuple(v.shape)).encode() + v.numpy().tobytes())
    assert digest.hexdigest() == "585b6068c872b1c66c3c3ccdbf97d85f8199505148de6b85e67ed436ea6a8def"


def test_the_cnn_trains_on_cifar_s_32x32_images(cifar_npz):
    ds = load_dataset(f"npz:{cifar_npz}")
    torch.manual_seed(0)
    before = build_model("cnn", ds.sample_shape, 10)
    assert before.fc1.in_features == 32 * 8 * 8
    result = train(small(ds, 64), TrainArgs(model="cnn", epochs=1, batch_size=32), device="cpu")
    assert isinstance(result.model, SmallCNN) and result.info["precision"] == "float32"
    assert all(torch.isfinite(v).all() for v in result.model.state_dict().values())
    assert not torch.equal(result.model.fc1.weight, before.fc1.weight)  # the same seed: trained, so moved
    assert predict_logits(result.model, ds.x_test).shape == (50, 10)


@pytest.mark.parametrize("shape", [(3, 3, 3), (1, 32, 2)])
def test_images_too_small_for_the_cnn_are_refused_naming_the_models_that_work(shape, tmp_path, capsys):
    with pytest.raises(BadInputError, match="^model cnn needs images of at least 4x4"):
        build_model("cnn", shape, 2)
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x=rng.integers(0, 256, (20, *shape), dtype=np.uint8), y=np.arange(20) % 2,
             x_test=rng.integers(0, 256, (4, *shape), dtype=np.uint8), y_test=np.arange(4) % 2)
    out, target = tmp_path / "runs", tmp_path / "table"
    assert main(["run", "--dataset", f"npz:{path}", "--model", "cnn", "--prune-ratio", "0.4", "--out", str(out),
                 "--target", str(target)]) == 2
    assert capsys.readouterr().err == ("dataset-prune: error: --model cnn needs images of at least 4x4 (it pools "
                                       f"twice by 2x2), got {shape[1]}x{shape[2]}; use resnet8 or linear\n")
    assert not out.exists() and not target.exists()


# --- the training precision -------------------------------------------------------------------

@pytest.mark.parametrize("supported", [True, False])
def test_auto_precision_is_bfloat16_for_the_cifar_resnets_where_the_device_has_it(supported, monkeypatch):
    monkeypatch.setattr(training, "bfloat16_supported", lambda device: supported)
    cpu = torch.device("cpu")
    chosen = {name: training_precision(TrainArgs(model=name), cpu)
              for name in ("linear", "cnn", "resnet18", f"{USER}:make_net", *CIFAR_RESNETS)}
    assert chosen == {"linear": "float64", "cnn": "float32", "resnet18": "float32", f"{USER}:make_net": "float32",
                      **dict.fromkeys(CIFAR_RESNETS, "bfloat16" if supported else "float32")}
    assert training_precision(TrainArgs(model="resnet8", precision="float32"), cpu) == "float32"
    assert training_precision(TrainArgs(model="cnn", precision="bfloat16"), cpu) == "bfloat16"


@pytest.mark.parametrize("args, message", [
    ({"model": "cnn", "low_res_epochs": 1}, "low_res_epochs applies to models that take any image size"),
    ({"model": "resnet8", "epochs": 2, "low_res_epochs": 3}, "low_res_epochs 3 must lie between 0 and epochs 2"),
])
def test_low_resolution_epochs_are_refused_where_they_cannot_apply(args, message):
    with pytest.raises(BadInputError, match=message):
        TrainArgs(**args)


def test_the_low_resolution_epochs_train_on_three_quarter_size_images_then_full_size(cifar_npz):
    ds = small(load_dataset(f"npz:{cifar_npz}"), 64)
    sizes = []
    model = build_model("resnet8", ds.sample_shape, ds.n_classes)
    model.register_forward_pre_hook(lambda module, inputs: sizes.append(tuple(inputs[0].shape[2:])) if module.training
                                    else None)
    train_network(model, ds, TrainArgs(model="resnet8", epochs=3, low_res_epochs=2, batch_size=32), device="cpu")
    assert sizes == [(24, 24)] * 4 + [(32, 32)] * 2  # two batches an epoch
    assert low_res_size((3, 32, 32)) == (24, 24) and low_res_size((1, 28, 28)) == (21, 21)
    with pytest.raises(BadInputError, match="downscales images"):
        low_res_size((784,))


def test_test_time_flips_average_each_image_with_its_mirror_image(cifar_npz):
    """Where the model trained on mirrored images (`augment`), its test accuracy is that of the mean
    logits of each test image and its mirror image; a mirror-symmetric image gets its own logits."""
    ds = load_dataset(f"npz:{cifar_npz}")
    torch.manual_seed(0)
    model = build_model("resnet8", ds.sample_shape, ds.n_classes).eval()
    x = ds.x_test[:8]
    plain, mirrored = predict_logits(model, x), predict_logits(model, np.ascontiguousarray(x[..., ::-1]))
    assert np.allclose(predict_logits(model, x, flips=True), (plain + mirrored) / 2)
    assert not np.allclose(plain, mirrored)
    symmetric = np.concatenate([x[..., :16], x[..., :16][..., ::-1]], axis=-1)
    assert np.allclose(predict_logits(model, symmetric, flips=True), predict_logits(model, symmetric))
    assert [TrainArgs(model=m).test_flips for m in ("resnet20", "cnn", "resnet18", "linear")] == [True, False, False,
                                                                                                   False]
    assert not TrainArgs(model="resnet20", augment=False).test_flips
    assert not TrainArgs(model="resnet20", test_flips=False).test_flips
    with pytest.raises(BadInputError, match="test-time flips apply to the networks"):
        TrainArgs(model="linear", test_flips=True)
    result = train(small(ds, 32), TrainArgs(model="resnet8", epochs=1, batch_size=32), device="cpu")
    flipped = predict_logits(result.model, ds.x_test, flips=True).argmax(1) == ds.y_test
    assert np.array_equal(result.test_correct, flipped) and result.test_accuracy == flipped.mean()


def test_bfloat16_is_asked_of_the_device_itself():
    """CUDA says whether it has bf16; a CPU, whether oneDNN has bf16 kernels for it."""
    assert training.bfloat16_supported(torch.device("cpu")) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not training.bfloat16_supported(torch.device("meta"))


def test_a_precision_is_refused_where_it_does_not_apply(small_npz, tmp_path, capsys):
    with pytest.raises(BadInputError, match="^precision 'half' is not known; valid: auto, float32, bfloat16$"):
        TrainArgs(model="cnn", precision="half")
    with pytest.raises(BadInputError, match="^precision bfloat16 applies to the networks; linear trains"):
        TrainArgs(model="linear", precision="bfloat16")
    for argv, expected in ((["--precision", "half"], "--precision 'half': Input should be 'auto', 'float32' or "
                                                     "'bfloat16'"),
                           (["--model", "linear", "--precision", "float32"], "--precision float32 applies to the "
                                                                             "networks; linear trains to its optimum"),
                           (["--checkpoint", str(tmp_path / "x.pt"), "--precision", "float32"],
                            "--precision with --checkpoint: nothing is trained")):
        (tmp_path / "x.pt").write_bytes(b"")
        assert main(["run", "--dataset", f"npz:{small_npz}", "--prune-ratio", "0.4", "--out", str(tmp_path / "runs"),
                     *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
        assert not (tmp_path / "runs").exists()


def test_bfloat16_training_runs_a_few_steps_and_keeps_float32_weights(cifar_npz):
    """resnet8 for 2 steps in bfloat16 autocast and in float32 from the same seed: both finite,
    weights float32 in the default memory layout, the precision used recorded, the results apart."""
    ds = small(load_dataset(f"npz:{cifar_npz}"), 64)
    runs = {p: train(ds, TrainArgs(model="resnet8", epochs=1, batch_size=32, precision=p), device="cpu")
            for p in ("bfloat16", "float32")}
    for precision, result in runs.items():
        assert result.info["precision"] == precision and result.info["args"]["precision"] == precision
        for value in result.model.state_dict().values():
            assert torch.isfinite(value.float()).all()
            assert value.dtype in (torch.float32, torch.int64) and value.is_contiguous()
        assert 0 <= result.test_accuracy <= 1
    assert not torch.equal(runs["bfloat16"].model.fc.weight, runs["float32"].model.fc.weight)


def test_a_default_precision_keeps_the_retrain_records_made_before_it():
    """The retraining cache's key of a recipe at the default precision (auto) is the one computed
    before the field existed (the digest of tests/test_training.py); another precision has its own."""
    x = np.arange(6 * 4, dtype=np.uint8).reshape(6, 1, 2, 2)
    ds = Dataset("d", x, np.arange(6) % 2, np.arange(6), x[:2], np.arange(2) % 2, 2, {"source": "npz:d"})
    rows = np.array([0, 2, 3])
    assert retrain_key(ds, rows, TrainArgs(model="cnn", seed=1), 4) == "ab699a8d547f48fa"
    keys = {retrain_key(ds, rows, TrainArgs(model="cnn", seed=1, precision=p), 4) for p in ("float32", "bfloat16")}
    assert len(keys) == 2 and "ab699a8d547f48fa" not in keys
    # test-time flips measure another accuracy: a ResNet's records made without them are not reused
    flips = {retrain_key(ds, rows, TrainArgs(model="resnet8", seed=1, test_flips=f), 4) for f in (True, False)}
    assert len(flips) == 2


# --- the user's own model ---------------------------------------------------------------------

def test_a_factory_model_keeps_the_user_s_names_and_finds_its_final_layer():
    torch.manual_seed(0)
    model = build_model(f"{USER}:make_net", (3, 8, 8), 4)
    assert isinstance(model, FactoryModel) and model.final_layer == "head" and model.fc is model.net.head
    own = SmallNet((3, 8, 8), 4)
    assert list(model.state_dict()) == list(own.state_dict())
    assert scope_parameter_names(model, "last-layer") == ["head.weight", "head.bias"]
    assert scope_parameter_names(model, "modules:body.4") == ["body.4.weight", "body.4.bias"]
    assert scope_parameter_names(model, "all") == [k for k, _ in own.named_parameters()]
    with pytest.raises(BadInputError, match="no module named 'fc'; modules with parameters: body.0, body.4, head"):
        scope_parameter_names(model, "modules:fc")
    x = torch.rand(5, 3, 8, 8)
    model.eval()
    assert model.features(x).shape == (5, 12) and torch.equal(model.fc(model.features(x)), model(x))
    np.testing.assert_allclose(predict_logits(model, x.numpy()), model(x).detach().double().numpy(), rtol=1e-5,
                               atol=1e-6)
    model.train()
    assert model.net.training and model.net.body.training


def test_a_factory_model_trains_and_its_last_layer_influence_matches_autograd_in_float64(cifar_npz):
    """Trained a few steps on real images, then in float64: the closed form over its own final
    layer (`head`) equals the autograd reference, which differentiates the whole network."""
    ds = small(load_dataset(f"npz:{cifar_npz}"), 64)
    result = train(ds, TrainArgs(model=f"{USER}:make_net", epochs=2, batch_size=16), device="cpu")
    assert result.info["precision"] == "float32" and result.info["args"]["epochs"] == 2
    model = result.model.double()
    x, y = ds.x[:30].astype(np.float64) / 255, np.array(ds.y[:30])
    fast = closed_form(model, x, y, weight_decay=0.01, damping=0.003)
    reference = inf.influence_vectors_autograd(model, x, y, weight_decay=0.01, damping=0.003)
    assert fast.shape == (30, 10 * 12 + 10)
    assert np.linalg.norm(fast - reference) / np.linalg.norm(reference) <= 1e-8


def test_per_sample_gradients_over_all_of_a_factory_model_are_autograd_s():
    """The `all` scope differentiates through `functional_call` on the wrapper: the network's own
    parameter (`scale`) and its submodules' are swapped where the network reads them."""
    torch.manual_seed(0)
    model = build_model(f"{USER}:make_net", (3, 8, 8), 4).double().eval()
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 3, 8, 8)), np.array([0, 3, 1])
    loss = ScopedLoss(model, scope_parameter_names(model, "all"))
    fast = loss.per_sample_gradients(x, y)
    for i in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.as_tensor(x[i:i + 1])), torch.as_tensor(y[i:i + 1])).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(fast[i], expected, rtol=1e-10, atol=1e-12)


def test_a_factory_model_s_checkpoint_holds_the_user_s_own_keys(cifar_npz, tmp_path):
    """What the product saves loads into the user's class directly, and `load_model` loads the
    user's own state_dict (weights_only) into the factory's model."""
    ds = load_dataset(f"npz:{cifar_npz}")
    torch.manual_seed(1)
    trained = build_model(f"{USER}:make_net", ds.sample_shape, 10)
    save_checkpoint(trained, tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    own = SmallNet(ds.sample_shape, 10)
    own.load_state_dict(state)  # strict: the same keys, the same shapes
    assert all(torch.equal(state[k], v) for k, v in own.state_dict().items())
    torch.save(own.state_dict(), tmp_path / "own.pt")  # as the user's own script saves it
    loaded = load_model(str(tmp_path / "own.pt"), f"{USER}:make_net", ds, device="cpu")
    assert isinstance(loaded, FactoryModel) and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


REFUSALS = {
    "module that does not import": ("tests.no_such_module:make_net", "--model tests.no_such_module:make_net: module "
                                    "tests.no_such_module does not import (ModuleNotFoundError: No module named "
                                    "'tests.no_such_module')"),
    "missing attribute": (f"{USER}:make_nett", f"--model {USER}:make_nett: {USER} has no attribute make_nett"),
    "not callable": (f"{USER}:NOT_CALLABLE", f"--model {USER}:NOT_CALLABLE: {USER}.NOT_CALLABLE is not callable (it is "
                     "of type int); give a factory (sample_shape, n_classes) -> nn.Module"),
    "no nn.Module": (f"{USER}:not_a_module", f"--model {USER}:not_a_module: the factory returned a list, not a "
                     "torch.nn.Module"),
    "factory that fails": (f"{USER}:fails", f"--model {USER}:fails: the factory failed on ((3, 32, 32), 10) "
                           "(ValueError: no model for these samples)"),
    "forward that fails": (f"{USER}:flat_input", f"--model {USER}:flat_input: its forward fails on a batch of shape "
                           "(2, 3, 32, 32) (RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    "output of another shape": (f"{USER}:wrong_classes", f"--model {USER}:wrong_classes: its output for a batch of "
                                "shape (2, 3, 32, 32) is (2, 11), not (2, 10) (n, n_classes)"),
    "last layer that is not linear": (f"{USER}:ends_in_softmax", f"--scope last-layer needs the model's final linear "
                                      f"layer, and --model {USER}:ends_in_softmax has none (its output is not its last "
                                      "nn.Linear '1' applied to that layer's input); use --scope all, or modules:NAME"),
    "no linear layer": (f"{USER}:ends_in_conv", f"--scope last-layer needs the model's final linear layer, and --model "
                        f"{USER}:ends_in_conv has none (it has no nn.Linear); use --scope all, or modules:NAME"),
    "not MODULE:CALLABLE": ("tests.user_models", "--model 'tests.user_models': Input should be linear, cnn, resnet18"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_user_model_that_cannot_serve_is_refused_in_one_line_with_nothing_written(case, cifar_npz, tmp_path, capsys):
    model, expected = REFUSALS[case]
    out, target = tmp_path / "runs", tmp_path / "table"
    assert main(["run", "--dataset", f"npz:{cifar_npz}", "--model", model, "--prune-ratio", "0.4", "--out", str(out),
                 "--target", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dataset-prune: error: {expected}"), err
    assert not out.exists() and not target.exists()


@pytest.mark.parametrize("name", ["ends_in_softmax", "ends_in_conv"])
def test_a_model_without_a_final_linear_layer_is_scored_over_all_its_parameters(name, cifar_npz, capsys):
    """The scope the last-layer refusal names is taken: its estimate is printed; the features
    of such a model (the embedding of herding and k-center) are its output."""
    assert main(["run", "--dataset", f"npz:{cifar_npz}", "--model", f"{USER}:{name}", "--scope", "all",
                 "--hessian", "cg", "--projection-dim", "32", "--prune-ratio", "0.4", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("influence stage estimate: n=200, p=")
    model = build_model(f"{USER}:{name}", (3, 32, 32), 10).eval()
    x = torch.rand(4, 3, 32, 32)
    assert model.final_layer is None and torch.equal(model.features(x), model(x))


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x.flatten(1)))


@pytest.mark.parametrize("net, shape, classes, reason", [
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3, bias=False)), (2, 2), 3,
     "its last nn.Linear '1' has no bias"),
    (Twice(), (4,), 4, "its last nn.Linear 'fc' is called 2 times in a forward pass, not once"),
    (torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Flatten()), (2, 2), 6,
     "its last nn.Linear '0' takes inputs of shape (2, 2, 2), not (n, d)"),
])
def test_a_last_linear_layer_that_is_not_the_closed_form_s_is_not_taken_as_final(net, shape, classes, reason):
    """The closed form takes one (n, d) input and a bias: otherwise the model has no final layer."""
    model = FactoryModel("m:f", net, shape, classes)
    assert model.final_layer is None and model.no_final_layer == reason


def test_a_worker_that_cannot_import_the_user_s_module_names_it(small_npz, tmp_path):
    from flows.preflight import worker_problem
    from pruning_core.pipeline import worker_view

    spec, here = f"npz:{small_npz}", load_dataset(f"npz:{small_npz}").fingerprint
    probe = tmp_path / ".workers-probe"
    probe.write_text("t0k3n")
    assert "model_error" not in worker_view(spec, None, str(probe), (), f"{USER}:make_net")
    view = worker_view(spec, None, str(probe), (), "absent_user_module:make_net")
    assert worker_problem(view, spec, here, "t0k3n", tmp_path) == (
        "cannot build the model (`model` absent_user_module:make_net: module absent_user_module does not import "
        "(ModuleNotFoundError: No module named 'absent_user_module')); every worker must import the model's module: "
        "install it on every worker, or put its folder on their PYTHONPATH")


# --- through the flow, on a Dask cluster ------------------------------------------------------

def test_the_prune_flow_runs_a_user_model_on_the_dask_workers(prefect_api, dask_cluster, cifar_npz, tmp_path):
    """The session's LocalCluster, whose workers import tests.user_models (they start with this
    process's sys.path): they build the model for the run's check, then load its checkpoint for
    the shards. The run folder's model.pt loads into the user's class."""
    from flows.parameters import RunParameters
    from flows.prune import prune_dataset
    from pruning_core.artifacts import load_scores

    manifest = prune_dataset(RunParameters(
        dataset=f"npz:{cifar_npz}", model=f"{USER}:make_net", epochs=1, batch_size=32, prune_ratio=0.4, shards=2,
        block_size=64, dask_address=dask_cluster, out=str(tmp_path / "runs"), target=str(tmp_path / "table")))
    run_dir = tmp_path / "runs" / manifest["run_id"]
    assert manifest["arguments"]["model"] == f"{USER}:make_net" and manifest["model"]["precision"] == "float32"
    SmallNet((3, 32, 32), 10).load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))  # strict
    ds = load_dataset(f"npz:{cifar_npz}")
    model = load_model(str(run_dir / "model.pt"), f"{USER}:make_net", ds, device="cpu")
    assert manifest["model"]["test_accuracy"] == accuracy(model, ds.x_test, ds.y_test, "cpu")
    _, vectors, _ = load_scores(run_dir / "scores.parquet")
    assert vectors.shape == (200, 10 * 12 + 10) and np.isfinite(vectors).all() and (vectors != 0).any()
    assert manifest["selection"]["n_pruned"] == 80 and manifest["version"]["version"] == 0


def test_a_cluster_whose_workers_cannot_import_the_model_is_refused_before_training(prefect_api, dask_cluster,
                                                                                    cifar_npz, tmp_path, monkeypatch,
                                                                                    capsys):
    """The module's folder joins this process's sys.path after the session's cluster started, as
    a user's module that only the submitting machine has: the run refuses in one line, naming the
    worker and the module, before it trains; nothing is left behind."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "late_user_model.py").write_text("from tests.user_models import make_net  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    out = tmp_path / "runs"
    code = main(["run", "--dataset", f"npz:{cifar_npz}", "--model", "late_user_model:make_net", "--prune-ratio", "0.4",
                 "--out", str(out), "--target", str(tmp_path / "table"), "--dask-address", dask_cluster])
    estimate, error = capsys.readouterr().err.strip().splitlines()  # the influence stage's estimate, then why not
    assert code == 2 and estimate.startswith("influence stage estimate: n=200")
    assert re.fullmatch(rf"dataset-prune: error: --dask-address {dask_cluster}: worker tcp://\S+ cannot build the "
                        r"model \(--model late_user_model:make_net: module late_user_model does not import "
                        r"\(ModuleNotFoundError: No module named 'late_user_model'\)\); every worker must import the "
                        r"model's module: install it on every worker, or put its folder on their PYTHONPATH",
                        error), error
    assert sorted(p.name for p in out.iterdir()) == [".staging"] and not any((out / ".staging").iterdir())
    assert not (tmp_path / "table").exists()
