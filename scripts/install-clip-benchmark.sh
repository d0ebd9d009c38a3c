#!/usr/bin/env bash
# Fetch clip_benchmark's image-text retrieval scoring for the tests that compare `unicom evaluate` with it.
#
# clip_benchmark's PyPI wheel holds its zero-shot retrieval and classification evaluations
# (clip_benchmark/metrics/zeroshot_retrieval.py and zeroshot_classification.py: torch, tqdm,
# scikit-learn) and its Flickr30k reader (clip_benchmark/datasets/flickr.py: torchvision and Pillow). This unpacks those
# modules, with their packages' __init__ files, and its per-dataset zero-shot prompts and class
# names (clip_benchmark/datasets/en_zeroshot_classification_templates.json, en_classnames.json)
# into .cache/clip-benchmark/VERSION/ of the
# repository (put that folder on sys.path to import them); the rest of the package and its
# dependencies are not needed. Does nothing when they are there. Never fails the caller: a
# test skips itself, saying why, when what it needs is absent.
#
# Environment: PYTHON (default: python3; any Python with pip), CLIP_BENCHMARK_VERSION.
set -u

VERSION="${CLIP_BENCHMARK_VERSION:-1.6.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.cache/clip-benchmark/$VERSION"

TEMPLATES=clip_benchmark/datasets/en_zeroshot_classification_templates.json
CLASSES=clip_benchmark/datasets/en_classnames.json
if [ ! -f "$DEST/clip_benchmark/metrics/zeroshot_retrieval.py" ] || [ ! -f "$DEST/clip_benchmark/metrics/zeroshot_classification.py" ] \
        || [ ! -f "$DEST/$TEMPLATES" ] || [ ! -f "$DEST/$CLASSES" ]; then
    "${PYTHON:-python3}" "$ROOT/scripts/unpack-wheel.py" "clip-benchmark==$VERSION" "$DEST" \
        clip_benchmark/__init__.py clip_benchmark/metrics/__init__.py clip_benchmark/metrics/zeroshot_retrieval.py \
        clip_benchmark/metrics/zeroshot_classification.py \
        clip_benchmark/datasets/__init__.py clip_benchmark/datasets/flickr.py "$TEMPLATES" "$CLASSES" \
        || echo "install-clip-benchmark: the tests that compare with clip_benchmark will be skipped"
fi
exit 0
