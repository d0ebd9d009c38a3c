"""Image-text retrieval: how well a model's captions find their images, and the reverse.

``unicom evaluate --dataset coco-captions | flickr30k | captions`` with a model that has a
text tower (a CLIP from open_clip, or a UniFEx model that keeps its backbone's space). The
images are embedded into ``OUT/embeddings/images/`` and the captions into
``OUT/embeddings/captions/`` (embedding folders; a killed run resumes, a rerun reads them
back). Both directions are scored by :func:`unicom.evaluate.metrics.retrieval_metrics`, an
image's id being the label of the image and of each of its captions:

* text to image: each caption searches the images; Recall@K is 1 when its image is among
  the K nearest;
* image to text: each image searches every caption; Recall@K is 1 when one of its own
  captions is among the K nearest (CLIP's protocol, clip_benchmark's ``zeroshot_retrieval``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from unicom.errors import InputError

DIRECTIONS = ("text_to_image", "image_to_text")
DIRECTION_NAMES = {"text_to_image": "text → image", "image_to_text": "image → text"}


def evaluate_image_text(
    name: str,
    root: str | os.PathLike,
    *,
    out: str | os.PathLike,
    model: str,
    pretrained: str | None = None,
    ks: Sequence[int] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    chunk_size: int | None = None,
    flip: bool = False,
    scales=None,
) -> dict:
    """Score ``model`` on image-text benchmark ``name`` (a key of
    :data:`unicom.data.benchmarks.CAPTION_BENCHMARKS`) read from ``root``; writes
    ``metrics.json`` and ``metrics.md`` under ``out`` and returns the report. ``flip``: each
    image embedding averaged with its mirror image's, ``scales``: at these scales of the model
    input (the captions as they are)."""
    from unicom.data.benchmarks import CAPTION_BENCHMARKS, canonical_name, load_caption_benchmark
    from unicom.evaluate.benchmark import _embedding_identity, _encoder, _model_info, embed_cached
    from unicom.evaluate.metrics import retrieval_metrics
    from unicom.evaluate.report import JSON_NAME, MARKDOWN_NAME, publish_report
    from unicom.files import json_text, write_bytes_synced

    name = canonical_name(name)
    split = load_caption_benchmark(name, root)  # missing files are named before a model is loaded
    encoder = _encoder(model, pretrained, device, flip, scales)
    if not encoder.has_text:
        raise InputError(
            f"--dataset {name} scores retrieval between images and captions: {encoder.name} has no text tower "
            f"({encoder.no_text_reason}); evaluate a model that embeds texts into its image space (an open_clip CLIP: "
            "--model ViT-B-32 --pretrained laion400m_e32), or its images alone on a retrieval benchmark")
    out = Path(out)
    identity = _embedding_identity(encoder, model, pretrained, name, flip, scales)
    images = embed_cached(encoder, split.images.paths, split.images.keys, out / "embeddings" / "images",
                          dict(identity, split="images"), batch_size=batch_size, num_workers=num_workers,
                          desc=f"embed {name} images")
    texts = embed_cached(encoder, split.captions, [split.images.keys[i] for i in split.caption_image.tolist()],
                         out / "embeddings" / "captions", dict(identity, split="captions",
                                                               captions_sha256=split.captions_sha256()),
                         batch_size=max(batch_size, 256), desc=f"embed {name} captions", modality="text")
    ks = tuple(ks) if ks else CAPTION_BENCHMARKS[name].ks
    image_ids = np.arange(len(split.images))
    report = {
        "dataset": name,
        **_model_info(model, pretrained, None, flip, scales),
        "protocol": {"images": len(split.images), "captions": len(split.captions), "ks": list(ks),
                     "annotations": split.source, "embedding_dim": int(images.shape[1])},
        "text_to_image": retrieval_metrics(texts, split.caption_image, images, image_ids, ks, chunk_size),
        "image_to_text": retrieval_metrics(images, image_ids, texts, split.caption_image, ks, chunk_size),
    }
    # the recalls of both directions at every k, averaged (at k = 1, 5, 10: papers' RSUM over six)
    recalls = [report[d][f"recall@{k}"] for d in DIRECTIONS for k in ks]
    report["mean_recall"] = float(np.mean(recalls))
    publish_report(out, {JSON_NAME: lambda path: write_bytes_synced(path, json_text(report).encode()),
                         MARKDOWN_NAME: lambda path: write_bytes_synced(path, image_text_markdown(report).encode())})
    return report


def image_text_markdown(report: dict) -> str:
    """The report as a markdown table: Recall@K (%) of both directions and their mean."""
    protocol = report["protocol"]
    from unicom.evaluate.report import report_heading

    heading = report_heading(report, ("dataset", "model"), "image-text retrieval")
    ks = protocol["ks"]
    lines = [f"# {heading}", "",
             f"{protocol['images']} images and {protocol['captions']} captions ({protocol['annotations']}), dimension "
             f"{protocol['embedding_dim']}: each caption searches the images for its own, each image searches the "
             "captions for one of its own.", "",
             "| direction | queries | " + " | ".join(f"recall@{k}" for k in ks) + " |",
             "|---" * (len(ks) + 2) + "|"]
    for direction in DIRECTIONS:
        metrics = report[direction]
        lines.append(f"| {DIRECTION_NAMES[direction]} | {metrics['n_queries']} | "
                     + " | ".join(f"{100 * metrics[f'recall@{k}']:.2f}" for k in ks) + " |")
    lines += ["", f"mean recall over both directions and k = {', '.join(map(str, ks))}: "
                  f"{100 * report['mean_recall']:.2f}"]
    return "\n".join(lines) + "\n"
