"""Label requests for drifted unlabelled batches, and checking the labels that come back.

- which images to label: a rule by name (`STRATEGIES`, `select`) over the champion's
  view of the batch (`Uncertainty`) and a budget (a count or a share, `budget_count`);
- the request folder (`write_request`): the chosen images, the champion's predicted
  masks as drafts to correct, `tasks.json` in Label Studio's task format with those drafts
  as pre-annotations (brush RLE, `brush_rle`), its labelling config and `request.json`;
- returned masks checked against the request (`check_labels`): same stems, classes in
  range, same size as the image.

Nothing here touches git, DVC or the registry: the loop (segloop.loop) versions, logs and
records what this writes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args
from xml.sax.saxutils import quoteattr

import numpy as np

from segloop.config import LabelSettings, LabelStrategy, Settings
from segloop.data.files import IMAGES, MASK_SUFFIXES
from segloop.records import write_json

REQUEST_JSON, TASKS_JSON, LABEL_CONFIG, DRAFTS = "request.json", "tasks.json", "label_config.xml", "drafts"
# Names of the labelling config's tags that the pre-annotations refer to.
FROM_NAME, TO_NAME = "label", "image"
# Label Studio serves a workspace's files under this URL once local-file serving is on
# with the workspace as LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (see the README).
LOCAL_FILES = "/data/local-files/?d="
SCHEMA = 1


def budget_count(budget: int | float, n: int) -> int:
    """Images to label out of `n`: `budget` is a count (int) or a share (float in (0, 1]); 1..n."""
    k = budget if isinstance(budget, int) else math.ceil(budget * n)
    return max(1, min(n, k))


@dataclass(frozen=True)
class Uncertainty:
    """The champion's view of a batch; rows follow `stems`."""

    stems: list[str]
    entropy: np.ndarray  # (N,) mean pixel entropy / log K, in [0, 1]: high = unsure
    margin: np.ndarray  # (N,) mean top-1 minus top-2 probability, in [0, 1]: low = unsure
    embeddings: np.ndarray  # (N, D) pooled deepest encoder features (what drift compares)


def k_center(embeddings: np.ndarray, k: int, first: int) -> list[int]:
    """Greedy k-center (Sener & Savarese 2018): after `first`, each pick is the point farthest
    from every point picked so far, so the picks cover the embedding space."""
    x = embeddings.astype(np.float64)
    picked = [first]
    distance = np.linalg.norm(x - x[first], axis=1)
    while len(picked) < k:
        nxt = int(np.argmax(distance))
        picked.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(x - x[nxt], axis=1))
    return picked


def _random(u: Uncertainty, k: int, cfg: LabelSettings) -> list[int]:
    return [int(i) for i in np.random.default_rng(cfg.seed).choice(len(u.stems), k, replace=False)]


def _entropy(u: Uncertainty, k: int, cfg: LabelSettings) -> list[int]:
    return [int(i) for i in np.argsort(-u.entropy, kind="stable")[:k]]


def _margin(u: Uncertainty, k: int, cfg: LabelSettings) -> list[int]:
    return [int(i) for i in np.argsort(u.margin, kind="stable")[:k]]


def _coreset(u: Uncertainty, k: int, cfg: LabelSettings) -> list[int]:
    first = int(np.random.default_rng(cfg.seed).integers(len(u.stems)))
    return k_center(u.embeddings, k, first)


def _hybrid(u: Uncertainty, k: int, cfg: LabelSettings) -> list[int]:
    # Uncertain first, then spread out among those: top-k by entropy alone tends to pick
    # near-duplicates of one hard scene.
    pool = _entropy(u, min(len(u.stems), math.ceil(cfg.hybrid_pool * k)), cfg)
    return [pool[i] for i in k_center(u.embeddings[pool], k, 0)]  # starting from the most uncertain


STRATEGIES: dict[str, Callable[[Uncertainty, int, LabelSettings], list[int]]] = {
    "random": _random,
    "entropy": _entropy,
    "margin": _margin,
    "coreset": _coreset,
    "hybrid": _hybrid,
}
assert set(STRATEGIES) == set(get_args(LabelStrategy)), f"{get_args(LabelStrategy)} != {list(STRATEGIES)}"


def select(u: Uncertainty, cfg: LabelSettings) -> list[int]:
    """Row indices of the images to label, in the order the rule picked them."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"labels.strategy {cfg.strategy!r}: unknown; valid: {list(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](u, budget_count(cfg.budget, len(u.stems)), cfg)


def champion_uncertainty(
    model_path: Path, folder: Path, settings: Settings, cache: Path | None
) -> tuple[Uncertainty, dict[str, np.ndarray]]:
    """The champion on every image of `folder` (a dataset folder): its `Uncertainty` and its
    predicted masks ((H, W) uint8 class ids, by stem: the drafts).

    Entropy and margin come from whole-image predictions (tiled like evaluation); the
    embeddings are drift's (`featurise_folder`, the same cache key: computed once per batch)."""
    import torch

    from segloop.data.dataset import to_tensor
    from segloop.data.files import list_samples, read_image
    from segloop.drift.features import featurise_folder, load_champion
    from segloop.inference import predict_logits

    champ = load_champion(model_path)
    d = settings.drift
    table = featurise_folder(folder, champ.channels, champ, cache, d.model_crop, d.batch_size, progress=False)
    assert table.embeddings is not None  # a champion gives embeddings
    entropy, margin, drafts = [], [], {}
    with torch.inference_mode():
        for sample in list_samples(folder, require_masks=False):
            x = to_tensor(read_image(sample.image, champ.channels))[None]
            probs = predict_logits(champ.model, x, settings.eval.max_size, settings.eval.overlap).softmax(1)[0]
            top2 = probs.topk(2, dim=0).values
            entropy.append(float(-(probs * probs.clamp_min(1e-12).log()).sum(0).mean() / math.log(probs.shape[0])))
            margin.append(float((top2[0] - top2[1]).mean()))
            drafts[sample.stem] = probs.argmax(0).to(torch.uint8).numpy()
    if list(drafts) != table.stems:
        raise ValueError(f"{folder}: images changed while the request was made")
    return Uncertainty(table.stems, np.array(entropy), np.array(margin), table.embeddings), drafts


# ---------------------------------------------------------------- Label Studio


RLE_SIZES = (3, 4, 8, 16)  # bit widths of a run's length that the brush RLE may use


def brush_rle(layer: np.ndarray) -> list[int]:
    """Label Studio's brush RLE of one (H, W) bool layer (label_studio_converter.brush.mask2rle's format).

    The layer as RGBA bytes (255 in all four channels where set) packed by thi-ng's rle-pack:
    a header (value count in 32 bits, word size - 1 in 5, four run-length widths - 1 in 4 each),
    then every run as a repeat run (bit 1, width index in 2 bits, length - 1, the byte).
    """
    values = np.repeat(layer.reshape(-1).astype(np.uint8) * 255, 4)
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [values.size]]))
    bits = [f"{values.size:032b}", f"{8 - 1:05b}", *(f"{s - 1:04b}" for s in RLE_SIZES)]
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        while length:
            n = min(length, 1 << RLE_SIZES[-1])
            i = next(i for i, s in enumerate(RLE_SIZES) if n - 1 < 1 << s)
            bits.append(f"1{i:02b}{n - 1:0{RLE_SIZES[i]}b}{values[start]:08b}")
            length -= n
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def label_config(classes: list[str]) -> str:
    """The Label Studio labelling config the tasks' pre-annotations refer to (BrushLabels on an Image)."""
    labels = "".join(f"\n    <Label value={quoteattr(c)}/>" for c in classes)
    return (
        f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">{labels}\n  </BrushLabels>\n</View>\n'
    )


def task(image_url: str, stem: str, draft: np.ndarray, classes: list[str], model_version: str, score: float) -> dict:
    """One Label Studio task: the image and the champion's draft as a prediction (one brush
    result per class present, which the annotator corrects)."""
    h, w = draft.shape
    results = [
        {
            "id": f"{stem}-{c}",
            "type": "brushlabels",
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "value": {"format": "rle", "rle": brush_rle(draft == c), "brushlabels": [classes[c]]},
        }
        for c in range(len(classes))
        if (draft == c).any()
    ]
    return {
        "data": {"image": image_url, "segloop_stem": stem},
        "predictions": [{"model_version": model_version, "score": score, "result": results}],
    }


# ---------------------------------------------------------------- the request


@dataclass
class LabelRequest:
    """`request.json`: what was asked, from which champion, and why these images."""

    batch: str
    domain: str
    champion_version: str
    strategy: str
    budget: int | float
    classes: list[str]
    images: list[dict]  # {"stem", "file", "width", "height", "entropy", "margin"}, in pick order
    batch_images: int
    mlflow_run: str | None = None
    schema: int = SCHEMA

    @classmethod
    def read(cls, folder: Path) -> LabelRequest:
        path = folder / REQUEST_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no label request there")
        raw = json.loads(path.read_text())
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"{path}: schema {raw.get('schema')}, this segloop reads schema {SCHEMA}")
        return cls(**raw)

    def write(self, folder: Path) -> None:
        write_json(folder / REQUEST_JSON, asdict(self))


def write_request(
    out: Path,
    images: Path,
    u: Uncertainty,
    chosen: list[int],
    drafts: dict[str, np.ndarray],
    request: LabelRequest,
    url_prefix: str,
) -> LabelRequest:
    """Write the request folder `out`: images/ (the chosen ones, copied from `images`),
    drafts/<stem>.png (palette masks of class ids), tasks.json, label_config.xml, request.json.
    `url_prefix` + images/<file> is each task's image URL."""
    from segloop.evaluate import save_mask

    if out.exists():
        raise FileExistsError(f"{out}: a label request is there already; refusing to overwrite")
    files = {p.stem: p for p in images.iterdir()}
    (out / IMAGES).mkdir(parents=True)
    (out / DRAFTS).mkdir()
    tasks = []
    for i in chosen:
        stem = u.stems[i]
        image, draft = files[stem], drafts[stem]
        shutil.copy2(image, out / IMAGES / image.name)
        save_mask(out / DRAFTS / f"{stem}.png", draft, len(request.classes))
        h, w = draft.shape
        request.images.append(
            {
                "stem": stem,
                "file": f"{IMAGES}/{image.name}",
                "width": w,
                "height": h,
                "entropy": float(u.entropy[i]),
                "margin": float(u.margin[i]),
            }
        )
        url = f"{url_prefix}{IMAGES}/{image.name}"
        tasks.append(task(url, stem, draft, request.classes, f"v{request.champion_version}", 1 - float(u.entropy[i])))
    (out / TASKS_JSON).write_text(json.dumps(tasks) + "\n")
    (out / LABEL_CONFIG).write_text(label_config(request.classes))
    request.write(out)
    return request


@dataclass
class LabelCheck:
    """Returned masks against a request: accepted (image, mask) pairs, rejected files with
    reasons, requested stems that came back without a mask."""

    accepted: list[tuple[Path, Path]] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def check_labels(request_dir: Path, folder: Path, num_classes: int) -> LabelCheck:
    """Check the masks in `folder` (or its masks/) against the request in `request_dir`:
    a PNG per requested stem, the image's size, class ids in range (or 255, ignore)."""
    from segloop.data.validate import ValidationResult, check_mask, files_by_stem

    request = LabelRequest.read(request_dir)
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise FileNotFoundError(f"{folder}: labels folder not found (links are never followed)")
    src = folder / "masks" if (folder / "masks").is_dir() else folder
    found = ValidationResult()
    masks = files_by_stem(src, MASK_SUFFIXES, found, "mask")
    out = LabelCheck(rejected=found.rejected)
    asked = {r["stem"]: r for r in request.images}
    for stem, mask in sorted(masks.items()):
        if stem not in asked:
            out.rejected.append({"file": str(mask), "reason": f"not in the label request of batch {request.batch}"})
            continue
        r = asked[stem]
        reason = check_mask(mask, (r["width"], r["height"]), num_classes)
        if reason is None:
            out.accepted.append((request_dir / r["file"], mask))
        else:
            out.rejected.append({"file": str(mask), "reason": reason})
    out.missing = sorted(set(asked) - set(masks))
    return out
