"""Build the bundled CIFAR-10 ResNet ONNX models and the calibration set for onnxmpq.

This is a build-time tool: it needs torch (the ``.venv-build`` environment) and is never
imported by the onnxmpq package. Three independent actions, selected by flags:

* ``--models``      export ResNet-20/32/56 (akamaster checkpoints) to ``models/*.onnx``
* ``--calibration`` write ``calibration/cifar10_train256.npz`` (256 unlabeled, preprocessed images)
* ``--evaluate``    measure float top-1 of the exported models on the 10,000 CIFAR-10 test JPEGs

Without flags all three run. Everything is deterministic: no random choice of images, and the
random tensor used to verify the export comes from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PREPROCESS = {"size": [32, 32], "scale": 1.0 / 255.0, "mean": list(MEAN), "std": list(STD),
              "layout": "NCHW", "channel_order": "RGB", "resize": "stretch", "crop": "none"}
# depth -> (blocks per stage, checkpoint file)
MODELS = {20: (3, "resnet20-12fca82f.th"), 32: (5, "resnet32-d509ac18.th"),
          56: (9, "resnet56-4bfd9763.th")}
OPSET = 13
CALIB_SIZE = 256


# ----------------------------------------------------------------------------- architecture
class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad planes//4 channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes = stride != 1 or in_planes != planes
        self.shortcut = ShortcutA(planes) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016) as in akamaster/pytorch_resnet_cifar10."""

    def __init__(self, blocks: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks, 1)
        self.layer2 = self._stage(16, 32, blocks, 2)
        self.layer3 = self._stage(32, 64, blocks, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def load_model(depth: int, ckpt_dir: Path) -> CifarResNet:
    """Build ResNet-``depth`` and load its akamaster checkpoint (``module.`` prefix stripped)."""
    blocks, fname = MODELS[depth]
    ckpt = torch.load(ckpt_dir / fname, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    model = CifarResNet(blocks)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The checkpoints predate BatchNorm's num_batches_tracked buffer; nothing else may differ.
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    return model.eval()


# ----------------------------------------------------------------------------- export
def export_model(depth: int, ckpt_dir: Path, out_dir: Path) -> Path:
    """Export one model to ONNX, add metadata, and verify it against torch."""
    model = load_model(depth, ckpt_dir)
    path = out_dir / f"resnet{depth}_cifar10.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated, and cannot fold step != 1 Slices; both are expected.
        warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                          opset_version=OPSET, do_constant_folding=True,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = tidy_graph(onnx.load(str(path)), set(model.state_dict()))
    names = [n.name for n in proto.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be non-empty and unique"
    proto.doc_string = (f"ResNet-{depth} for CIFAR-10 (akamaster/pytorch_resnet_cifar10, "
                        "BSD-2-Clause), exported by onnxmpq models/build_models.py")
    onnx.helper.set_model_props(proto, {"onnxmpq.preprocess": json.dumps(PREPROCESS),
                                        "onnxmpq.labels": json.dumps(CLASSES)})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    verify(model, path)
    return path


def tidy_graph(proto: onnx.ModelProto, torch_names: set[str]) -> onnx.ModelProto:
    """Fold constant subgraphs into initializers and give Conv parameters their torch names.

    torch cannot fold the step -1 Slice inside its lowering of ``F.pad``, so every Option-A
    shortcut arrives as a ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chain computing the
    Pad amounts. Evaluating every node whose inputs are all constant leaves a plain Pad whose
    ``pads`` is an initializer, and no Constant nodes. The BN-folded Conv weights come out as
    ``onnx::Conv_NNN``; they are renamed ``layer1.0.conv1.weight`` / ``.bias`` after their node.
    """
    graph = proto.graph
    const = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept = []
    for node in graph.node:  # nodes are in topological order
        if all(i in const for i in node.input if i):
            if node.op_type == "Constant":
                values = [numpy_helper.to_array(node.attribute[0].t)]
            else:
                values = ReferenceEvaluator(node).run(None, {i: const[i] for i in node.input if i})
            const.update(zip(node.output, values))
        else:
            kept.append(node)
    rename = {}
    for node in kept:
        if node.op_type == "Conv":  # "/layer1/layer1.0/conv1/Conv" -> "layer1.0.conv1"
            module = ".".join(node.name.strip("/").split("/")[:-1][-2:])
            for old, kind in zip(node.input[1:], ("weight", "bias")):
                rename[old] = f"{module}.{kind}"
    weights = {v for v in rename.values() if v.endswith(".weight")}
    assert weights == {n for n in torch_names if ".weight" in n and "conv" in n}, weights
    order = dict.fromkeys(i for n in kept for i in n.input if i in const)
    del graph.initializer[:], graph.node[:]
    graph.initializer.extend(numpy_helper.from_array(const[n], rename.get(n, n)) for n in order)
    for node in kept:
        node.input[:] = [rename.get(i, i) for i in node.input]
    graph.node.extend(kept)
    del graph.value_info[:]  # the exporter writes none; never keep shapes of folded tensors
    return proto


def verify(model: nn.Module, path: Path, batch: int = 7, tol: float = 1e-4) -> None:
    """Check onnxruntime matches torch on a fixed-seed random batch (exercises dynamic batch)."""
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, 32, 32), np.float32))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    err = float(np.abs(got - ref).max())
    assert got.shape == (batch, 10) and err < tol, (got.shape, err)
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    params = sum(p.numel() for p in model.parameters())
    print(f"{path.name}: max|ort-torch|={err:.2e} params={params} "
          f"bytes={path.stat().st_size} ops={dict(sorted(ops.items()))}")


# ----------------------------------------------------------------------------- data
def preprocess(file: Path) -> np.ndarray:
    """One image file -> float32 CHW array: RGB, 32x32, /255, (x-mean)/std."""
    img = Image.open(file).convert("RGB")
    if img.size != (32, 32):
        img = img.resize((32, 32), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * np.float32(PREPROCESS["scale"])
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def class_files(split_dir: Path) -> list[list[Path]]:
    """Per class (alphabetical), the JPEG files of that class in sorted name order."""
    return [sorted((split_dir / c).glob("*.jpg")) for c in CLASSES]


def write_calibration(data_dir: Path, out: Path, n: int = CALIB_SIZE) -> None:
    """Write ``n`` train-subset images, round-robin over classes in file order.

    Order: image 0 of airplane, automobile, ..., truck, then image 1 of each class, ... and stop
    after ``n`` images. For n=256 that is the first 26 images of the first six classes and the
    first 25 of the last four, and every prefix of the array is (nearly) class-balanced.
    """
    per_class = class_files(data_dir / "train-subset")
    files = [f for row in zip(*per_class) for f in row][:n]
    assert len(files) == n, f"only {len(files)} images available"
    batch = np.stack([preprocess(f) for f in files])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, input=batch)
    print(f"{out}: input {batch.shape} {batch.dtype} from {files[0].parent.parent}")


def evaluate(model_paths: list[Path], data_dir: Path, batch: int = 500) -> dict[str, float]:
    """Float top-1 of each model on the CIFAR-10 test JPEGs with onnxruntime."""
    files, labels = [], []
    for label, row in enumerate(class_files(data_dir / "test")):
        files += row
        labels += [label] * len(row)
    x = np.stack([preprocess(f) for f in files])
    y = np.array(labels)
    results = {}
    for path in model_paths:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pred = np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0].argmax(1)
                               for i in range(0, len(x), batch)])
        results[path.name] = float((pred == y).mean())
        print(f"{path.name}: top-1 {results[path.name]:.4f} on {len(y)} test images")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", action="store_true", help="export the ONNX models")
    parser.add_argument("--calibration", action="store_true", help="write the calibration npz")
    parser.add_argument("--evaluate", action="store_true", help="measure float top-1")
    parser.add_argument("--depths", type=int, nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--data", type=Path, default=DATA, help="shared data directory")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "models", help="ONNX output directory")
    parser.add_argument("--calib-out", type=Path, default=ROOT / "calibration" / "cifar10_train256.npz")
    parser.add_argument("--eval-json", type=Path, help="also write the top-1 numbers to this JSON file")
    args = parser.parse_args()
    run_all = not (args.models or args.calibration or args.evaluate)
    torch.manual_seed(0)
    paths = [args.out_dir / f"resnet{d}_cifar10.onnx" for d in args.depths]
    if args.models or run_all:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for depth in args.depths:
            export_model(depth, args.data / "resnet-cifar10", args.out_dir)
    if args.calibration or run_all:
        write_calibration(args.data / "cifar10", args.calib_out)
    if args.evaluate or run_all:
        results = evaluate(paths, args.data / "cifar10")
        if args.eval_json:
            args.eval_json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
