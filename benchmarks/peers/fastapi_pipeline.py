"""The hand-rolled peer: a plain FastAPI app calling transformers' image-classification pipeline per request.

No batching across requests: each upload is decoded, preprocessed (``DeiTImageProcessorPil``, the reference
processor) and classified on its own, in FastAPI's thread pool (a sync endpoint). ``/health`` answers once the
model is loaded and warm.

    .venv/bin/python -m benchmarks.peers.fastapi_pipeline --model-dir DIR --port 8001 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image
from transformers import DeiTForImageClassificationWithTeacher, DeiTImageProcessorPil, pipeline


def create_app(model_dir: Path, dtype: torch.dtype) -> FastAPI:
    model = DeiTForImageClassificationWithTeacher.from_pretrained(model_dir, dtype=dtype).eval()
    processor = DeiTImageProcessorPil.from_pretrained(model_dir)
    classifier = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    classifier(Image.new("RGB", (640, 480)))  # warm-up
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/classify")
    def classify(file: UploadFile, top_k: int = 5) -> dict[str, Any]:
        image = Image.open(file.file)
        predictions = classifier(image, top_k=top_k)
        return {"results": [{"filename": file.filename, "predictions": predictions}]}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    app = create_app(args.model_dir, getattr(torch, args.dtype))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
