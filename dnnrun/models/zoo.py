"""Model-zoo networks: `model=zoo model.arch=resnet18 model.weights=PATH` reuses a torchvision
classification architecture, by name, with the weights of a file (or, with a network, of
torchvision's own download), as the seeds' transfer-learning advice has it: keep the lower layers
of a network trained on a large set, give it a new output layer for this run's classes.

    inputs    grey images repeated to 3 channels, resized on the device to the size the weights
              expect (data.resize, default: theirs), normalized with their mean and std
    features  the architecture as torchvision builds it, its last Linear layer (the classifier)
              replaced by the identity
    output    a new Linear layer for this run's classes, initialized by the init group

The architecture's own activations and norms stay as they are (act and norm do not apply). The
transfer options count its stages, the top-level children of the architecture that have weights
(resnet18: conv1, bn1, layer1..layer4): transfer.layers=k reuses the weights of the first k,
transfer.freeze keeps them fixed, unfreeze_after and unfreeze_lr_factor train them again later.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from dnnrun.config.schema import Problems, unknown
from dnnrun.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dnnrun.models.network import Network
    from dnnrun.models.registry import Inputs, Layers

# torch and torchvision are imported where a network is built, not here: checking a config must not
# wait for them. The allow-list is torchvision 0.29's `torchvision.models.list_models(module=
# torchvision.models)`: its classification models (tests/test_zoo.py holds it to the installed
# torchvision's registry). An architecture is named, never imported by path.
ARCHITECTURES = (
    "alexnet",
    "convnext_base",
    "convnext_large",
    "convnext_small",
    "convnext_tiny",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "efficientnet_v2_l",
    "efficientnet_v2_m",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_x_16gf",
    "regnet_x_1_6gf",
    "regnet_x_32gf",
    "regnet_x_3_2gf",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_8gf",
    "regnet_y_128gf",
    "regnet_y_16gf",
    "regnet_y_1_6gf",
    "regnet_y_32gf",
    "regnet_y_3_2gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_8gf",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "vit_b_16",
    "vit_b_32",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "wide_resnet101_2",
    "wide_resnet50_2",
)
AUXILIARY = {"inception_v3": "AuxLogits.", "googlenet": "aux"}  # training-time side heads, left out
log = logging.getLogger("dnnrun")


@dataclasses.dataclass(frozen=True)
class ZooConfig:
    name: str
    arch: str = "resnet18"  # a torchvision classification architecture (ARCHITECTURES)
    # a .safetensors file or a weights-only state_dict (.pt/.pth) of that architecture, or the name of
    # torchvision's weights (ResNet18_Weights.IMAGENET1K_V1, or DEFAULT), downloaded; null: random weights
    weights: str | None = None
    option: str | None = None  # the YAML it came from (conf/model/OPTION.yaml)

    def check(self, problems: Problems, key: str) -> None:
        if self.arch not in ARCHITECTURES:
            problems.add(f"{key}.arch", unknown("architecture", self.arch, ARCHITECTURES))

    @property
    def widths(self) -> list[int]:
        return []  # no hidden blocks of dnnrun's own


def recipe(arch: str) -> tuple[int, int, list[float], list[float]]:
    """(size, smallest size, mean, std) of the inputs the architecture's torchvision weights expect:
    from their metadata, which needs no download."""
    import torchvision.models

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    transforms = weights.transforms()
    smallest = max(weights.meta.get("min_size", (1, 1)))
    return transforms.crop_size[0], smallest, list(transforms.mean), list(transforms.std)


def build(cfg: ZooConfig, inputs: Inputs, layers: Layers) -> Network:
    """The architecture with random weights (model.weights are loaded by `load_weights` and
    `reuse`, as transfer.source is), a new output layer, and the input layer in front."""
    import torchvision.models
    from torch import nn

    from dnnrun.models.network import OUTPUT, ZooInputs, ZooNetwork
    from dnnrun.techniques.init import initialize

    if inputs.shape is None:
        raise UserError("model=zoo needs images; this data's examples are vectors (use an image set, or model=mlp)")
    if inputs.shape[0] not in (1, 3):
        raise UserError(f"model=zoo takes grey or colour images (1 or 3 channels); this data's have {inputs.shape[0]}")
    if cfg.arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(
            f"model.arch={cfg.arch} is not in the installed torchvision {torchvision.__version__}; "
            f"upgrade torchvision or choose another architecture"
        )
    size, smallest, mean, std = recipe(cfg.arch)
    size = inputs.resize or size
    if size < smallest:
        raise UserError(f"data.resize={size}: {cfg.arch} needs images of at least {smallest} x {smallest}")
    options = {"aux_logits": False, "init_weights": True} if cfg.arch in AUXILIARY else {}
    features = torchvision.models.get_model(cfg.arch, weights=None, **options)
    name, classifier = _classifier(features, cfg.arch)
    features.set_submodule(name, nn.Identity())
    output = nn.Linear(classifier.in_features, inputs.classes)
    initialize(output, layers.init, output=output)  # the new output layer: init.output's rule
    return ZooNetwork(OrderedDict([("inputs", ZooInputs(size, mean, std)), ("features", features), (OUTPUT, output)]))


def _classifier(features: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    """The architecture's last Linear layer: its classifier, which a new output layer replaces."""
    from torch import nn

    linear = [(n, m) for n, m in features.named_modules() if isinstance(m, nn.Linear)]
    last = [n for n, m in features.named_modules() if any(True for _ in m.parameters(recurse=False))][-1]
    if not linear or linear[-1][0] != last:
        raise UserError(
            f"model.arch={arch} does not end in a Linear classifier (its last layer is {last}); "
            "choose an architecture that does (resnet, vgg, densenet, efficientnet, mobilenet, ...)"
        )
    return linear[-1]


def load_weights(cfg: ZooConfig) -> dict[str, torch.Tensor]:
    """model.weights as a state dict of the architecture, keys as torchvision names them: a
    safetensors file, a weights-only torch file, or torchvision's weights by name (downloaded);
    refused when a tensor is not a real one (checkpoint.tensor_problem: a crafted file's expanded
    tensor, checked before anything copies it) or a weight is not finite."""
    from dnnrun.store import checkpoint

    state = _read_weights(cfg)
    problems = (checkpoint.tensor_problem(name, t) for name, t in state.items())
    if problem := next(filter(None, problems), None) or checkpoint.weights_problem(state):
        raise UserError(f"model.weights: {cfg.weights} cannot be used: {problem}")
    return state


def _read_weights(cfg: ZooConfig) -> dict[str, torch.Tensor]:
    import torch

    path = Path(cfg.weights).expanduser()
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
        if not path.is_file():
            raise UserError(f"model.weights: no file at {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors' and torch's errors for a file that is not theirs
            raise UserError(
                f"model.weights: cannot read {path} as a safetensors file or a weights-only state_dict "
                f"({' '.join(str(exc).split())[:200]})"
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()
        ):
            raise UserError(f"model.weights: {path} holds no state_dict (a mapping of parameter names to tensors)")
        return state
    return _download(cfg)


def _download(cfg: ZooConfig) -> dict[str, torch.Tensor]:
    import torchvision.models

    enum = torchvision.models.get_model_weights(cfg.arch)
    member = cfg.weights.rsplit(".", 1)[-1]
    if member not in enum.__members__:
        raise UserError(
            f"model.weights={cfg.weights}: neither a file nor weights of {cfg.arch}; valid names: "
            f"{', '.join(f'{enum.__name__}.{m}' for m in enum.__members__)}, or a .safetensors or .pt path"
        )
    try:
        return enum[member].get_state_dict(progress=False)
    except Exception as exc:  # no network: URLError, or a partial download
        raise UserError(
            f"model.weights={cfg.weights}: cannot download {enum[member].url} "
            f"({' '.join(str(exc).split())[:200]}); put the file on this machine and give its path: "
            "model.weights=PATH"
        ) from None


def fitting(state: dict[str, torch.Tensor], model: nn.Module, stages: int | None, arch: str) -> dict[str, torch.Tensor]:
    """The weights to copy, under the model's names (features.*), for its first `stages` stages
    (null: all); weights that do not fit the architecture are refused with the differences."""
    names = [name for name, _ in model.stages()]
    k = len(names) if stages is None else stages
    if k > len(names):
        raise UserError(
            f"transfer.layers={k}, but {arch} has {len(names)} stages "
            f"({', '.join(n.removeprefix('features.') for n in names)})"
        )
    shapes = {n: t.shape for n, t in model.state_dict().items() if n.startswith("features.")}
    auxiliary = AUXILIARY.get(arch)
    given = {f"features.{n}": t for n, t in state.items() if not (auxiliary and n.startswith(auxiliary))}
    classifier = {n for n in given if n not in shapes}  # the replaced last Linear (fc., classifier.6., head.)
    problems = [
        f"{n}: the file {tuple(t.shape)}, {arch} {tuple(shapes[n])}"
        for n, t in given.items()
        if n in shapes and t.shape != shapes[n]
    ]
    problems += [f"{n.removeprefix('features.')} is in {arch} but not in the file" for n in shapes if n not in given]
    if len(classifier) > 2:  # more than a weight and a bias: another architecture's file
        problems.append(
            f"the file has {len(classifier)} tensors {arch} does not, e.g. "
            f"{', '.join(sorted(n.removeprefix('features.') for n in classifier)[:3])}"
        )
    if problems:
        raise UserError(f"model.weights do not fit model.arch={arch}:\n  - " + "\n  - ".join(problems[:8]))
    reused = tuple(f"{n}." for n in names[:k])
    return {n: t for n, t in given.items() if n.startswith(reused)}


def reuse(
    model: nn.Module, state: dict[str, torch.Tensor], stages: int | None, arch: str, source: str
) -> tuple[list[str], list[int]]:
    """Copy the weights of the reused stages; (the parameter names copied, the stages' 1-based indices)."""
    copied = fitting(state, model, stages, arch)
    model.load_state_dict(copied, strict=False)
    names = [name for name, _ in model.stages()]
    k = len(names) if stages is None else stages
    log.info(
        "model.weights: reused %s's stages %s from %s",
        arch,
        ", ".join(n.removeprefix("features.") for n in names[:k]),
        source,
    )
    params = {n for n, _ in model.named_parameters()}
    return [n for n in copied if n in params], list(range(1, k + 1))
