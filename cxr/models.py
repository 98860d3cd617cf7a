"""The classifier: a keras.applications backbone with its preprocessing inside, raw 0-255 grayscale in.

    image (S, S, 1) raw 0..255
      -> gray_to_rgb  (fixed 1x1 conv, copies the channel three times)
      -> preprocess   (the backbone's own `preprocess_input` convention, as plain Keras layers)
      -> backbone     (nested keras.applications model; its output is the last 4-D conv feature map)
      -> pool -> dropout -> predictions (softmax, float32)

A fine-tuned ensemble (`ensemble`) keeps that chain: its backbone runs the frozen lower part once and each
member's top blocks on it, their feature maps side by side, and its `predictions` (MeanOfSoftmaxes) average
the members' softmaxes.

A plain chain of standard layers: no Lambda, so models load with safe_mode on, and Grad-CAM can split
the chain at the backbone. Binary tasks use a 2-way softmax so evaluation has one code path.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import keras
import numpy as np

from . import network
from . import weights as imagenet_weights
from .errors import UserError

log = logging.getLogger("models")

BACKBONES = {
    "mobilenetv2": "MobileNetV2",
    "efficientnetb0": "EfficientNetB0",
    "resnet50": "ResNet50",
    "densenet121": "DenseNet121",
}
_CAFFE_MEAN = [103.939, 116.779, 123.68]
_TORCH_MEAN, _TORCH_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def preprocess_layers(arch: str) -> list[keras.layers.Layer]:
    """The arch's keras.applications `preprocess_input`, as serialisable layers (input: RGB 0..255)."""
    if arch == "mobilenetv2":  # 'tf' mode: scale to [-1, 1]
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")]
    if arch == "efficientnetb0":  # the backbone rescales and normalises inside itself
        return []
    if arch == "resnet50":  # 'caffe' mode: BGR, mean-centred; channels are equal, so only the mean matters
        return [keras.layers.Normalization(mean=_CAFFE_MEAN[::-1], variance=[1.0] * 3, name="preprocess")]
    if arch == "densenet121":  # 'torch' mode
        return [keras.layers.Rescaling(1 / 255.0, name="preprocess_scale"),
                keras.layers.Normalization(mean=_TORCH_MEAN, variance=np.square(_TORCH_STD).tolist(), name="preprocess")]
    raise UserError(f"unknown model.arch {arch!r}; choose one of {', '.join(BACKBONES)}")


def _weights_arg(source: str, arch: str) -> str | None:
    if source == "none":
        return None
    if source == "imagenet":
        return "imagenet"
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"model.weights: {source} is not a file (use imagenet, none, or a path to {arch} ImageNet weights, include_top=False)")
    return str(path)


def _shape_detail(message: str) -> str:
    """What differs, from Keras' message on weights that do not fit a model (its first line alone often ends
    in a colon, with the shapes further down), as a short phrase: the first weight whose shape differs, or the
    layer or weight counts."""
    one = " ".join(message.split())
    m = re.search(r"variable\.shape=(\(.*?\)), Received: value\.shape=(\(.*?\))", one)
    if m:
        where = re.search(r"Target variable: <Variable path=([^,>]+)", one)
        return f"{where.group(1) if where else 'a weight'} has shape {m.group(2)} in the file, {m.group(1)} in this model"
    m = re.search(r"for weight (\S+?)\.? Weight expects shape (\(.*?\))\. Received saved weight with shape (\(.*?\))", one)
    if m:
        return f"{m.group(1)} has shape {m.group(3)} in the file, {m.group(2)} in this model"
    m = re.search(r"Layer '([^']+)' expected (\d+) variables, but received (\d+)", one)
    if m:
        return f"layer {m.group(1)} has {m.group(3)} weights in the file, {m.group(2)} in this model"
    m = re.search(r"Model expected (\d+) layers, found (\d+) saved layers", one)
    if m:
        return f"the file holds {m.group(2)} layers, this model {m.group(1)}"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return first.rstrip(":") or "the shapes differ"


def _weights_that_do_not_fit(source: str, arch: str, alpha: float, image_size: int, detail: str) -> UserError:
    width = "set model.alpha to the file's width, or " if arch == "mobilenetv2" else ""
    return UserError(f"model.weights={source} does not fit {imagenet_weights.describe(arch, alpha, image_size)}: {detail}. "
                     f"Use a weights file made for these params (keras.applications names it "
                     f"{imagenet_weights.file_name(arch, alpha, image_size)}), or {width}set model.weights to imagenet or none")


def backbone(arch: str, image_size: int, source: str, alpha: float = 1.0) -> keras.Model:
    """The keras.applications backbone without its top, input (S, S, 3) preprocessed pixels; `source` is
    params' model.weights (imagenet, none, or a weights file)."""
    cls = getattr(keras.applications, BACKBONES[arch])
    kwargs = {"alpha": alpha} if arch == "mobilenetv2" else {}
    w = _weights_arg(source, arch)
    try:
        net = cls(include_top=False, weights=w, input_shape=(image_size, image_size, 3), **kwargs)
    except ValueError as err:
        raise _weights_that_do_not_fit(source, arch, alpha, image_size, _shape_detail(str(err))) from None
    except Exception as err:  # network errors from the weights download come in many types
        if w != "imagenet":
            raise
        name = imagenet_weights.file_name(arch, alpha, image_size)
        raise UserError(
            f"cannot download ImageNet weights for {imagenet_weights.describe(arch, alpha, image_size)} ({network.reason(err)}). "
            f"Offline? Put {name} (from {imagenet_weights.url(arch, alpha, image_size)}) into {imagenet_weights.cache_dirs()[0]}/, "
            f"or set model.weights to a local copy of it (-S model.weights=path/to/{name}), or to none"
        ) from None
    net.name = "backbone"
    if w is None:
        # Trained from scratch: moving statistics must catch up within a few hundred steps, not thousands.
        for layer in net.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        # Zero-init residual (Goyal et al. 2017): the BatchNorm that ends each residual branch starts with
        # gamma 0, so every residual block starts as the identity; from scratch on a few hundred images the
        # net then learns faster and more reliably.
        add, bn = {"mobilenetv2": ("_add", "_project_BN"), "efficientnetb0": ("_add", "_project_bn"),
                   "resnet50": ("_add", "_3_bn")}.get(arch, ("", ""))
        names = {layer.name for layer in net.layers}
        for layer in net.layers:
            branch = layer.name[: -len(add)] + bn if add and layer.name.endswith(add) else None
            if isinstance(layer, keras.layers.Add) and branch in names:
                gamma = net.get_layer(branch).gamma
                gamma.assign(keras.ops.zeros(gamma.shape, gamma.dtype))
    return net


def pretrained(model_params: dict) -> bool:
    """Whether the backbone starts from trained weights (ImageNet, a weights file, or `model.init`): then its
    BatchNorm statistics are kept (inference mode), also when fine-tuning."""
    return model_params["weights"] != "none" or model_params.get("init", "none") != "none"


def build(arch: str, num_classes: int, image_size: int, weights: str = "imagenet", alpha: float = 1.0, dropout: float = 0.2,
          l2: float = 0.0, init: str = "none") -> keras.Model:
    """The full classifier with a frozen backbone (the baseline's starting point); `l2` regularises the head.
    With `init` (a model saved by this project) the backbone starts from that model's, not from `weights`:
    see initialise_from."""
    if init != "none":
        weights = "none"  # overwritten by initialise_from; no ImageNet download for nothing
    net = backbone(arch, image_size, weights, alpha)
    net.trainable = False
    inputs = keras.Input((image_size, image_size, 1), name="image")
    gray_to_rgb = keras.layers.Conv2D(3, 1, use_bias=False, kernel_initializer="ones", trainable=False, name="gray_to_rgb")
    x = gray_to_rgb(inputs)
    for layer in preprocess_layers(arch):
        x = layer(x)
    # Pretrained BatchNorm statistics are kept: the backbone always runs in inference mode. Without
    # pretrained weights there are no statistics worth keeping, and BatchNorm trains when unfrozen.
    x = net(x, training=False) if pretrained({"weights": weights, "init": init}) else net(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    reg = keras.regularizers.L2(l2) if l2 else None
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", kernel_regularizer=reg, name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"cxr_{arch}")


def _first_difference(mine: keras.Model, theirs: keras.Model) -> str | None:
    """Where two backbones' weights differ in shape (the first such weight, or their counts); None if nowhere."""
    for a, b in zip(mine.weights, theirs.weights):
        if tuple(a.shape) != tuple(b.shape):
            return f"{b.path} has shape {tuple(b.shape)} in the saved model, {tuple(a.shape)} in this one"
    if len(mine.weights) != len(theirs.weights):
        return f"its backbone has {len(theirs.weights)} weights, this one {len(mine.weights)}"
    return None


def initialise_from(model: keras.Model, source: str | Path, classes: list[str], alpha: float) -> dict:
    """Transfer (`model.init`): copy the backbone's weights from a model this project saved (e.g. the
    radiography model into the binary ieee8023 model), and its head too when it was trained on the same
    classes in the same order. The source must have the same architecture, width (`alpha`, params'
    model.alpha) and input size; anything else is one UserError naming the params involved. Returns what
    was copied."""
    from . import modelinfo

    info = modelinfo.read_info(Path(source))
    src = load(source)
    mine, theirs = get_backbone(model), get_backbone(src)
    arch, size = model.name.removeprefix("cxr_"), model.input_shape[1]
    other_arch = info.get("arch") not in (None, arch)
    differs = _first_difference(mine, theirs)
    if other_arch or differs or src.input_shape[1:] != model.input_shape[1:]:
        why = f"it is a {info['arch']} model" if other_arch else differs or f"it takes {src.input_shape[1]} px images"
        raise UserError(f"model.init={source} does not fit {imagenet_weights.describe(arch, alpha, size)}: {why}. Set "
                        f"model.arch, model.alpha and clean.image_size to the saved model's ({info.get('arch', 'its arch')}, "
                        f"{info.get('image_size')} px), or model.init to none")
    mine.set_weights(theirs.get_weights())
    same_head = list(info["classes"]) == list(classes)
    if same_head:
        model.get_layer("predictions").set_weights(src.get_layer("predictions").get_weights())
    return {"backbone": 1, "head": int(same_head)}


def get_backbone(model: keras.Model) -> keras.Model:
    return model.get_layer("backbone")


def outer_layers(model: keras.Model) -> tuple[list, list]:
    """The model's own layers before the backbone (channel copy, preprocessing) and after it (pool, dropout,
    predictions), in order."""
    names = [layer.name for layer in model.layers]
    i = names.index("backbone")
    return model.layers[1:i], model.layers[i + 1 :]


def before_backbone(model: keras.Model):
    """The outer layers between the raw-pixel input and the backbone, as one callable."""
    layers = outer_layers(model)[0]

    def run(x):
        for layer in layers:
            x = layer(x)
        return x

    return run


def feature_extractor(model: keras.Model) -> keras.Model:
    """Everything up to the pooled features (what the frozen baseline can cache)."""
    return keras.Model(model.inputs, model.get_layer("pool").output, name="features")


def head(model: keras.Model) -> keras.Model:
    """The trainable head on pooled features; shares its layers (and weights) with `model`."""
    pool = model.get_layer("pool")
    inp = keras.Input(pool.output.shape[1:], name="features")
    out = model.get_layer("predictions")(model.get_layer("dropout")(inp))
    return keras.Model(inp, out, name="head")


def first_trainable_layer(net: keras.Model, unfreeze_from: str) -> int:
    """Index of the first backbone layer that fine-tuning trains: the first layer named `unfreeze_from` or
    starting with `unfreeze_from_` (a block, e.g. MobileNetV2's `block_13`, ResNet50's `conv5_block1`),
    or 1 (everything after the input) for `all`."""
    if unfreeze_from == "all":
        return 1
    for i, layer in enumerate(net.layers):
        if layer.name == unfreeze_from or layer.name.startswith(unfreeze_from + "_"):
            return i
    blocks = sorted({re.sub(r"_(expand|depthwise|project|pad|\d+_conv|0_conv|1_conv|se|activation|bn|add|out|concat).*$", "", l.name)
                     for l in net.layers[1:]})
    raise UserError(f"finetune.unfreeze_from: no {net.name} layer or block named {unfreeze_from!r} in this backbone "
                    f"(e.g. {', '.join(blocks[-6:])}, or all)")


def split_backbone(model: keras.Model, unfreeze_from: str) -> tuple[keras.Model, keras.Model]:
    """(lower, top): the backbone cut where fine-tuning starts. `lower` maps preprocessed pixels to the
    boundary activations, `top` maps those to the backbone's output; both share the backbone's layers, so
    training `top` trains the full model. A cut inside a block (where later layers also read earlier
    tensors) is one clear error."""
    net = get_backbone(model)
    i = first_trainable_layer(net, unfreeze_from)
    boundary = net.layers[i].input
    if isinstance(boundary, (list, tuple)):
        raise UserError(f"finetune.unfreeze_from: {net.layers[i].name} reads several tensors; name the start of a block")
    try:
        top = keras.Model(boundary, net.output, name="backbone_top")
    except ValueError:
        raise UserError(f"finetune.unfreeze_from: layers above {net.layers[i].name} also read tensors below it; "
                        "name the start of a block") from None
    lower = keras.Model(net.input, boundary, name="backbone_lower")
    return lower, top


def top_model(model: keras.Model, top: keras.Model) -> keras.Model:
    """What fine-tuning trains on cached activations: the boundary activations in, `top` (split_backbone's)
    then `model`'s head (pool, dropout, predictions) out. Shares its layers and weights with `model`."""
    inp = keras.Input(top.input.shape[1:], name="boundary")
    out = model.get_layer("predictions")(model.get_layer("dropout")(model.get_layer("pool")(top(inp))))
    return keras.Model(inp, out, name="finetune_top")


def unfreeze_from(model: keras.Model, start: str, freeze_batchnorm: bool = True) -> int:
    """Make the backbone trainable from block `start` up (see first_trainable_layer); BatchNorm stays
    frozen, in inference mode, unless freeze_batchnorm is off (a backbone without pretrained weights).
    Returns how many layers with weights became trainable."""
    net = get_backbone(model)
    cut = first_trainable_layer(net, start)
    net.trainable = True
    count = 0
    for i, layer in enumerate(net.layers):
        train = i >= cut and not (freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization))
        layer.trainable = train
        count += train and bool(layer.weights)
    return count


@keras.saving.register_keras_serializable(package="cxr")
class MeanOfSoftmaxes(keras.layers.Layer):
    """An ensemble's output layer: `members` softmax classifiers, member i on the i-th of `members` equal slices
    of its input (the members' pooled features side by side), their class probabilities averaged. Weights:
    `kernel` (members x F, units), each member's Dense kernel stacked, and `bias` (members, units); dividing
    both by T tempers every member (scale_logits)."""

    def __init__(self, units: int, members: int, **kwargs):
        super().__init__(**kwargs)
        self.units, self.members = int(units), int(members)

    def build(self, input_shape):
        if input_shape[-1] % self.members:
            raise ValueError(f"{input_shape[-1]} features do not split into {self.members} members")
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="kernel")
        self.bias = self.add_weight(shape=(self.members, self.units), initializer="zeros", name="bias")

    def call(self, x):
        ops = keras.ops
        f = self.kernel.shape[0] // self.members
        x = ops.reshape(ops.cast(x, self.compute_dtype), (-1, self.members, f))
        z = ops.einsum("bmf,mfk->bmk", x, ops.reshape(self.kernel, (self.members, f, self.units))) + self.bias
        return ops.mean(ops.softmax(z, axis=-1), axis=1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "members": self.members}


def member_count(model: keras.Model) -> int:
    """How many fine-tuning runs the model averages (1 for a single model)."""
    layer = model.get_layer("predictions")
    return layer.members if isinstance(layer, MeanOfSoftmaxes) else 1


def ensemble(model: keras.Model, unfreeze_from: str, members: int, load_member) -> keras.Model:
    """One model averaging the softmaxes of fine-tuning runs that differ only above `unfreeze_from`: the frozen
    lower backbone runs once, then each member's copy of the top blocks (layers named member<i>_...), side by
    side, then pool, dropout and MeanOfSoftmaxes. `load_member(i)` puts member i's weights into `model`. The same
    raw-pixel input and outer layers as `model`, so evaluation, Grad-CAM and prediction see one ordinary model."""
    lower, top = split_backbone(model, unfreeze_from)
    dense = model.get_layer("predictions")
    net_in = keras.Input(get_backbone(model).input_shape[1:], name="backbone_input")
    boundary = lower(net_in)
    outs, kernels, biases = [], [], []
    for i in range(members):
        load_member(i)
        copy = keras.models.clone_model(top, clone_function=lambda layer, i=i: layer.__class__.from_config(
            {**layer.get_config(), "name": f"member{i}_{layer.name}"}))
        copy.set_weights(top.get_weights())
        outs.append(keras.Model(copy.input, copy.output, name=f"member{i}")(boundary))
        kernel, bias = dense.get_weights()
        kernels.append(kernel)
        biases.append(bias)
    net = keras.Model(net_in, keras.layers.Concatenate(name="members")(outs), name="backbone")
    inp = keras.Input(model.input_shape[1:], name="image")
    x = net(before_backbone(model)(inp), training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(model.get_layer("dropout").rate, name="dropout")(x)
    head = MeanOfSoftmaxes(dense.units, members, dtype="float32", name="predictions")
    out = head(x)
    head.set_weights([np.concatenate(kernels), np.stack(biases)])
    return keras.Model(inp, out, name=model.name)


def scale_logits(model: keras.Model, temperature: float) -> None:
    """Temperature scaling folded into the softmax layer: softmax((Wx + b) / T) == softmax((W/T) x + b/T)
    (for an ensemble, each member's softmax), so a calibrated model keeps the same layers (and loads anywhere the uncalibrated one did)."""
    dense = model.get_layer("predictions")
    dense.set_weights([w / temperature for w in dense.get_weights()])


def load(path: str | Path) -> keras.Model:
    """Load a saved model (safe_mode on). A missing or wrong file is one clear UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} not found (run `dvc repro` or `dvc pull`, or pass --model)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:
        raise UserError(f"{path} is not a loadable Keras model: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
