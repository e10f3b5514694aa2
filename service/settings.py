"""All configuration in one pydantic-settings class: ``DEIT_*`` environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The embedded demo model ships inside the package, so the default store is found from any directory and install.
DEFAULT_MODEL_STORE = Path(__file__).resolve().parent / "data" / "model_store"


class Settings(BaseSettings):
    """Service settings. Every field can be set as ``DEIT_<NAME>`` or ``--<name>``."""

    model_config = SettingsConfigDict(env_prefix="DEIT_", extra="forbid", frozen=True)

    model_store: Path = Field(DEFAULT_MODEL_STORE, description="directory with one sub-directory (or .pth) per model")
    model: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="a model on the Hugging Face hub, [NAME=]REPO_ID[@REVISION] (e.g. "
        "facebook/deit-base-distilled-patch16-224), served beside the store's; the flag repeats, the variable is "
        "comma-separated; needs the hub extra",
    )
    allow_hub_ids: bool = Field(
        False,
        description="let /v2/repository/models/{name}/load download a model by hub id at run time "
        '(body {"parameters": {"hub_id": "REPO_ID[@REVISION]"}}); needs api_keys',
    )
    ui: bool = Field(True, description="serve the try-it page at GET / (browsers); --no-ui leaves GET / to JSON only")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="port of the Open Inference Protocol over gRPC, on the same host (0: off; needs the grpc extra)",
    )
    grpc_max_concurrent_streams: int = Field(
        100, ge=1, le=100_000, description="gRPC calls one client connection may have open at once"
    )
    otlp_endpoint: str | None = Field(
        None,
        description="export OpenTelemetry traces over OTLP to this collector (http://host:4318/v1/traces for "
        "OTLP/HTTP, host:4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc); the OTEL_* variables apply (needs the "
        "tracing extra; off when empty)",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float16 on CUDA, bfloat16 on CPUs with native bf16, else float32"
    )
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8 on the CPU: torch and onnxruntime quantize the encoder's Linear layers dynamically "
        "(int8 weights and activations), openvino compresses its weights to int8 (activations stay float32); "
        "top-1 may change on close calls",
    )
    runtime: Literal["torch", "openvino", "onnxruntime", "auto"] = Field(
        "torch",
        description="what runs the forward pass on the CPU: torch (our module), openvino or onnxruntime (the module "
        "exported at load, extras of the same names), or auto: the fastest installed one whose outputs agree with "
        "float32 torch, measured at load; CUDA always runs torch",
    )
    runtime_cache: Path | None = Field(
        None,
        description="where exported OpenVINO/ONNX artefacts are kept between starts (default: "
        "$XDG_CACHE_HOME/deit-serve/runtimes, else ~/.cache/deit-serve/runtimes)",
    )
    runtime_measure_s: float = Field(
        0.5, gt=0, le=30, description="with --runtime auto: seconds each candidate runtime is timed at load"
    )
    cuda_graphs: bool = Field(
        False,
        description="replay the forward pass from CUDA graphs captured per bucketed batch size (powers of two up to "
        "max_batch_size; a batch is padded to its bucket); CUDA only",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per forward pass, at most")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=1000, description="longest a partial batch waits for images still being decoded"
    )
    max_queue_size: int = Field(256, ge=1, description="images queued per model before new requests get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="default deadline of a classification request")
    max_request_timeout_s: float = Field(120.0, gt=0, description="cap on the X-Request-Timeout header")
    default_model: str | None = Field(None, description="model used when a request names none (default: first)")
    default_top_k: int = Field(5, ge=1, description="predictions returned when top_k is not given")
    preprocess_threads: int = Field(2, ge=1, le=64, description="threads decoding and preprocessing images")
    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="intra-op threads of a forward pass that runs alone (0: torch default); passes that run "
        "beside others use one each",
    )
    forward_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="batches of one model that may run at once (0: auto: 2 on a two-thread CPU or on CUDA, else 1)",
    )
    jpeg_draft: bool = Field(
        False,
        description="decode large JPEGs at 1/2, 1/4 or 1/8 scale (no smaller than the resize): several times faster "
        "for photos, but the pixels differ slightly from the reference preprocessing",
    )
    preprocess_device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="cuda: decode JPEGs with nvJPEG (torchvision) and resize, crop and normalize them on the model's "
        "GPU; other formats, and JPEGs it does not take (CMYK, progressive), are decoded on the CPU",
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body accepted")
    max_files: int = Field(64, ge=1, description="most images in one request")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (width × height)")
    max_inflight_upload_bytes: int = Field(
        0,
        ge=0,
        description="request-body bytes held in memory at once, all requests together; more are refused (503) "
        "before they are read (0: auto: 8 largest uploads, at most an eighth of the memory)",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted requests may finish")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="largest request head (request line and headers) before 431"
    )
    max_headers: int = Field(100, ge=1, le=10_000, description="most header fields in a request before 431")
    header_timeout_s: float = Field(
        10.0, gt=0, description="time to send a complete request head; also closes a new connection that sends nothing"
    )
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(1024, ge=1, description="open connections; one more is answered 503 and closed")
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before the server accepts them")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field((), description="comma-separated API keys; empty: no auth")
    protect_metrics: bool = Field(False, description="require an API key on /metrics too")
    poll_store_s: float = Field(
        0.0,
        ge=0,
        description="every this many seconds, load new or changed models and versions of the model store and unload "
        "removed ones (0: off; load and unload through /v2/repository then)",
    )
    warmup: bool = Field(True, description="run a dummy batch per model before reporting ready")
    load_timeout_s: float = Field(
        600.0,
        gt=0,
        description="longest a model version's load and warm-up may take at run time (repository API, store "
        "polling); past it the load fails and what was serving still serves",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(True, description="one JSON log line per request")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = tuple(k.strip() for k in value.split(",") if k.strip())
            if value.strip() and not keys:
                # Only separators and blanks: a typo that would otherwise turn authentication off in silence.
                raise ValueError(f"{value!r} holds no API key; leave the setting empty to serve without keys")
            return keys
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(m.strip() for m in value.split(",") if m.strip())
        return value

    @model_validator(mode="after")
    def _hub_ids_need_keys(self) -> Settings:
        if self.allow_hub_ids and not self.api_keys:
            raise ValueError("allow_hub_ids lets a client make the server download: it needs api_keys")
        return self

    @field_validator("model_store")
    @classmethod
    def _store_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model store {value} is not a directory")
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> Settings:
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("request_timeout_s must not exceed max_request_timeout_s")
        return self

    @model_validator(mode="after")
    def _int8_in_float32(self) -> Settings:
        if self.quantize == "int8" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"quantize int8 runs float32 activations; dtype {self.dtype} cannot be combined with it")
        return self
