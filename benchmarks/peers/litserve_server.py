"""The LitServe peer: transformers' DeiT behind ``litserve`` with its dynamic batching enabled.

LitServe's API process parses the upload and hands it to one inference worker process, which decodes and
preprocesses each request (``DeiTImageProcessorPil``, the reference processor), stacks up to ``max_batch_size``
of them (waiting at most ``batch_timeout``), runs the batch, and answers each request with its top-k.

    .venv/bin/python -m benchmarks.peers.litserve_server --model-dir DIR --port 8002 --dtype bfloat16
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import Request
from PIL import Image
from torch import Tensor
from transformers import DeiTForImageClassificationWithTeacher, DeiTImageProcessorPil


class DeiTAPI(ls.LitAPI):  # type: ignore[misc]
    def __init__(self, model_dir: Path, dtype: torch.dtype, top_k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.dtype = dtype
        self.top_k = top_k

    def setup(self, device: str) -> None:
        self.model = DeiTForImageClassificationWithTeacher.from_pretrained(self.model_dir, dtype=self.dtype).eval()
        self.processor = DeiTImageProcessorPil.from_pretrained(self.model_dir)
        self.labels = self.model.config.id2label
        size = self.model.config.image_size
        self.predict(torch.zeros(self.max_batch_size, 3, size, size))  # warm-up at the model's input size

    # LitServe reads the payload type from this annotation at run time (Request: form or JSON body), so this
    # module does not use postponed annotations.
    def decode_request(self, request: Request) -> Tensor:
        image = Image.open(request["file"].file).convert("RGB")
        pixels: Tensor = self.processor(image, return_tensors="pt")["pixel_values"][0]
        return pixels

    def batch(self, inputs: list[Tensor]) -> Tensor:
        return torch.stack(inputs)

    def predict(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            logits = self.model(pixel_values=x.to(self.dtype)).logits
            return torch.softmax(logits.float(), dim=-1)

    def unbatch(self, output: Tensor) -> list[Tensor]:
        return list(output)

    def encode_response(self, probs: Tensor) -> dict[str, Any]:
        scores, indices = probs.topk(self.top_k)
        predictions = [
            {"label": self.labels[i], "score": s} for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
        return {"results": [{"predictions": predictions}]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a partial batch waits")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    api = DeiTAPI(
        args.model_dir,
        getattr(torch, args.dtype),
        args.top_k,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(port=args.port, host="127.0.0.1", log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
