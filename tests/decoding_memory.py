"""Run as a program: the memory that decoding images for ``unicom serve`` really holds.

For each kind of image (``MODE:FORMAT``, noise of WIDTH x HEIGHT pixels) it prints a JSON
line: the kernel's high-water mark of this process's resident memory over one decoding
(``VmHWM``, reset just before it through ``/proc/self/clear_refs``, after the C allocator
gave its free memory back), and what the server counts for it, for an upload decoded for a
model (short side to 224, centre crop 224) and for an item's thumbnail. Linux only.

    python tests/decoding_memory.py 1600 1200 RGB:JPEG I;16:PNG

With ``fetch`` and sizes in bytes, the same for fetching a file of each size from an HTTP
server on 127.0.0.1 as ``/knn-service`` fetches an ``image_url``, against what the fetches
budget counts while its bytes arrive::

    python tests/decoding_memory.py fetch 6250000
"""

from __future__ import annotations

import ctypes
import io
import json
import sys

import numpy as np
from PIL import Image


def high_water_mark() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def reset_high_water_mark() -> int:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak resident set size becomes the current one
    return high_water_mark()


def noise_image(mode: str, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32) * 255)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def main(width: int, height: int, kinds: list[str]) -> None:
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from torchvision import transforms as T

    from unicom.search.item_images import ItemImages
    from unicom.search.uploads import ModelInput, decode_for_model, probe_image

    prepare = ModelInput(T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)]))
    with TemporaryDirectory() as folder:
        items = ItemImages(folder, None, cache=0)
        for kind in kinds:
            mode, format = kind.rsplit(":", 1)
            buffer = io.BytesIO()
            noise_image(mode, width, height).save(buffer, format=format)
            data = buffer.getvalue()
            (Path(folder) / "item").write_bytes(data)

            found, size, opened = probe_image(data, kind, len(data), width * height) if format != "TIFF" else \
                (format, (width, height), Image.open(io.BytesIO(data)).mode)
            counted = prepare.held_bytes(size, opened, found)
            base = reset_high_water_mark()
            decode_for_model(data, kind, prepare, width * height)
            upload = high_water_mark() - base

            source, counted_thumbnail = items._sized_source({"image_path": "item"}, 0)
            base = reset_high_water_mark()
            items._render(source, 0)
            thumbnail = high_water_mark() - base
            print(json.dumps({"kind": kind, "mode": opened, "upload": [upload, counted],
                              "thumbnail": [thumbnail, counted_thumbnail]}), flush=True)


def fetches(sizes: list[int]) -> None:
    import asyncio
    import os
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from storage_servers import QuietHandler, serve

    from unicom.search.batching import ByteBudget
    from unicom.search.uploads import fetch_held

    files = {f"/{size}": os.urandom(size) for size in sizes}

    class Files(QuietHandler):
        def do_GET(self):
            data = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    async def measure(url: str) -> None:
        budget = ByteBudget(2**40)
        for position, size in enumerate([sizes[0], *sizes]):  # the first: threads and imports, unmeasured
            for _ in range(3):  # the callbacks of the last fetch, which hold its bytes, run
                await asyncio.sleep(0)
            base = reset_high_water_mark()
            budget.peak = 0
            data, held = await fetch_held(f"{url}/{size}", 2**40, budget)
            found = {"fetch": size, "held": high_water_mark() - base, "counted": budget.peak}
            await budget.release(held)
            del data
            if position:
                print(json.dumps(found), flush=True)

    server = serve(Files)
    try:
        asyncio.run(measure(f"http://127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    if sys.argv[1] == "fetch":
        fetches([int(size) for size in sys.argv[2:]])
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
