"""The HTTP app: OpenAI-compatible routes (chat completions, embeddings, models) and BLIP-2's own (caption,
ask, itm, retrieve), over one `Engine`. Every error is OpenAI's JSON error shape with its status; nothing a
client sends produces a traceback in a response (it is logged here instead)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip2.data.text import chat_prompt
from blip2.inference.pipeline import CAPTION_DEFAULTS, VQA_DEFAULTS
from blip2.models.losses import max_over_queries
from blip2.serve import schemas
from blip2.serve.engine import CallJob, Engine, GenerationJob, ImageRef, QueueFull, Result, ShuttingDown
from blip2.serve.limits import BodyLimit, RequestMetrics
from blip2.serve.media import MediaError, MediaImage, MediaPolicy, decode_image_bytes, load_media

log = logging.getLogger("blip2.serve")

CHAT_MAX_NEW_TOKENS = 30  # a chat answer's default length (OpenAI's is "up to the context"; BLIP-2 answers are short)


@dataclass
class ServerConfig:
    model_name: str = "blip2"
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 20 * 1024 * 1024
    request_timeout_s: float = 120.0
    max_prompt_tokens: int | None = None  # None: the LLM's context
    max_new_tokens_limit: int = 256
    max_beams: int = 8
    index_path: str | None = None  # a photo index (`blip2 index`) served at /v1/search


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          503: "server_busy", 504: "timeout"}


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or _KINDS.get(status, "server_error"), "param": param,
                      "code": status}}


def _validation_message(err: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        msg = "unknown field" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid request: " + "; ".join(parts)


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    blip2 = engine.blip2
    has_llm = blip2.tokenizer is not None and hasattr(blip2.model, "language_model")
    has_heads = blip2.qformer_tokenizer is not None and blip2.model.config.stage1_heads

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has already let the requests in flight finish (or time out); fail what is still queued.
            await asyncio.to_thread(engine.stop)

    photo_index = None
    if config.index_path is not None:
        from blip2.collections.index import PhotoIndex, model_fingerprint

        photo_index = PhotoIndex.open(config.index_path)
        photo_index.check_model(model_fingerprint(blip2))  # an index of another model is refused at start

    app = FastAPI(title="blip2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=engine.metrics)  # outermost: counts the 413s too

    # -- errors -------------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError):
        return JSONResponse(error_body(err.status, err.message, err.kind, err.param), err.status, headers=err.headers)

    @app.exception_handler(MediaError)
    async def _media_error(_: Request, err: MediaError):
        return JSONResponse(error_body(err.status, err.message), err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError):
        return JSONResponse(error_body(400, _validation_message(err)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error (logged on the server)"), 500)

    # -- helpers ------------------------------------------------------------------------------------------
    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken must not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           param="model")

    def need_llm(route: str) -> None:
        if not has_llm:
            raise ApiError(400, f"{route} needs a model with a language model (a stage-2 checkpoint such as "
                                f"Salesforce/blip2-opt-2.7b); this server's model has none")

    def need_heads(route: str) -> None:
        if not has_heads:
            raise ApiError(400, f"{route} needs a model with image-text matching heads (a stage-1 or retrieval "
                                f"checkpoint such as Salesforce/blip2-itm-vit-g); this server's model has none")

    async def parse(request: Request, model: type[BaseModel], files: tuple[str, ...] = ()) -> tuple[Any, dict]:
        """JSON, or multipart with image files in `files` fields: (validated body, {field: [MediaImage]})."""
        ctype = request.headers.get("content-type", "")
        uploads: dict[str, list[MediaImage]] = {}
        if ctype.startswith("multipart/form-data") and files:
            try:
                form = await request.form(max_files=schemas.MAX_IMAGES, max_fields=schemas.MAX_TEXTS + 32)
            except Exception as err:  # noqa: BLE001 - a malformed multipart body is the client's mistake
                raise ApiError(400, f"cannot read the multipart body: {err}") from None
            data: dict[str, Any] = {}
            for key in form.keys():
                values = form.getlist(key)
                if key in files:
                    blobs = [await v.read() for v in values if hasattr(v, "read")]
                    if len(blobs) != len(values):
                        raise ApiError(400, f"field {key!r} must be an uploaded image file", param=key)
                    uploads[key] = [await asyncio.to_thread(decode_image_bytes, b, config.media) for b in blobs]
                    data[key] = ["upload"] * len(blobs)
                else:
                    data[key] = values if len(values) > 1 or key in ("questions", "texts") else values[0]
            for key in files:  # a single upload for a single-image field
                if key in data and key in ("image",):
                    data[key] = data[key][0]
            try:
                return model.model_validate(data), uploads
            except ValidationError as err:
                raise ApiError(400, _validation_message(err)) from None
        if ctype and not ctype.startswith("application/json"):
            raise ApiError(415, f"send JSON (application/json){' or multipart/form-data' if files else ''}, "
                                f"not {ctype.split(';')[0]}")
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        try:
            return model.model_validate(payload), uploads
        except ValidationError as err:
            raise ApiError(400, _validation_message(err)) from None

    async def media(url: str) -> MediaImage:
        return await load_media(url, config.media)

    async def image_ref(img: MediaImage) -> ImageRef:
        return await asyncio.to_thread(engine.image_ref, img.sha256, img.image)

    async def run(request: Request, jobs: list, wait: bool = True) -> list:
        """Submit jobs, await them under the time limit; a client that leaves cancels them."""
        try:
            for job in jobs:
                engine.submit(job)
        except QueueFull as err:
            for job in jobs:
                job.cancelled.set()
            raise ApiError(503, f"{err}; retry shortly", headers={"Retry-After": "1"}) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), headers={"Retry-After": "5"}) from None
        if not wait:
            return jobs

        async def watch() -> list:
            pending = {job.future for job in jobs}
            while pending:
                _, pending = await asyncio.wait(pending, timeout=0.25)
                if pending and await request.is_disconnected():
                    raise ConnectionAbortedError
            return [job.future.result() for job in jobs]

        try:
            return await asyncio.wait_for(watch(), config.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than the server's limit of {config.request_timeout_s:g} s",
                           kind="timeout") from None
        except ConnectionAbortedError:
            raise ApiError(499, "client disconnected") from None
        except (ValueError, MediaError) as err:
            raise ApiError(getattr(err, "status", 400), str(err)) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), headers={"Retry-After": "5"}) from None
        finally:
            for job in jobs:
                if not job.future.done():
                    job.cancelled.set()

    def generation(defaults: dict, settings: dict) -> dict:
        """Validated settings (the library's checks) within the server's limits, before anything is queued."""
        try:
            gen = blip2._generation(defaults, settings)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if gen["max_new_tokens"] > config.max_new_tokens_limit:
            raise ApiError(400, f"max_new_tokens must be <= {config.max_new_tokens_limit} on this server, "
                                f"got {gen['max_new_tokens']}")
        if gen.get("num_beams", 1) > config.max_beams:
            raise ApiError(400, f"num_beams must be <= {config.max_beams} on this server, got {gen['num_beams']}")
        gen.pop("pad_token_id", None)
        return gen

    # Prompt lengths are checked before queuing, on a private copy of the tokenizer: the worker thread uses
    # the model's, and a fast tokenizer must not be used by two threads at once.
    checker = copy.copy(blip2)
    checker.tokenizer = copy.deepcopy(blip2.tokenizer)
    checker_lock = threading.Lock()

    async def check_prompts(prompts: list[str], max_new_tokens: int) -> None:
        def check() -> None:
            with checker_lock:
                checker.check_prompts(prompts, max_new_tokens, config.max_prompt_tokens)
        try:
            await asyncio.to_thread(check)
        except ValueError as err:
            raise ApiError(400, str(err)) from None

    async def run_call(request: Request, fn: Callable[[Engine], Any]) -> Any:
        """Any other model work (matching, retrieval, embeddings, search) on the worker, like a generation job."""
        (result,) = await run(request, [CallJob(asyncio.get_running_loop(), fn)])
        return result

    def usage(results: list[Result]) -> dict:
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -- open routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name,
                "capabilities": {"generate": has_llm, "match": bool(has_heads)}}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        html = resources.files("blip2.serve").joinpath("static/index.html")
        if not html.is_file():
            raise ApiError(404, "the web page is not installed")
        return HTMLResponse(html.read_text(encoding="utf-8"))

    # -- OpenAI ---------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                             "owned_by": "blip2"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body, _ = await parse(request, schemas.ChatCompletionRequest)
        check_model(body.model)
        need_llm("/v1/chat/completions")
        if body.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (one completion per request), got {body.n}", param="n")
        image_url, history, question, system = conversation(body.messages)
        template = blip2.question_template  # InstructBLIP: the instruction as it is
        prompt = chat_prompt(history, question, template) if (question or history) else ""
        if system:
            prompt = f"{system} {prompt}".strip()
        settings: dict[str, Any] = {"max_new_tokens": body.max_completion_tokens or body.max_tokens or CHAT_MAX_NEW_TOKENS,
                                    "num_beams": body.num_beams or 1, "min_new_tokens": body.min_tokens or 0}
        sample = (body.temperature or 0) > 0 or (body.top_p is not None and body.temperature is None)
        if sample:
            settings.update(do_sample=True, temperature=body.temperature or 1.0)
            if body.top_p is not None:
                settings["top_p"] = body.top_p
        if body.seed is not None:
            settings["seed"] = body.seed
        if body.length_penalty is not None:
            settings["length_penalty"] = body.length_penalty
        if body.repetition_penalty is not None:
            settings["repetition_penalty"] = body.repetition_penalty
        gen = generation({}, settings)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "stop takes at most 4 sequences", param="stop")
        img = await media(image_url)
        await check_prompts([prompt], gen["max_new_tokens"])
        ref = await image_ref(img)
        question_for_qformer = question if blip2.model.config.question_to_qformer else None
        job = GenerationJob(asyncio.get_running_loop(), ref, prompt, question_for_qformer, gen, stop, body.stream)
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            await run(request, [job], wait=False)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chat(job, rid, created, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        (result,) = await run(request, [job])
        return {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result), "logprobs": None}],
                "usage": usage([result])}

    async def stream_chat(job: GenerationJob, rid: str, created: int, include_usage: bool):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        deadline = time.monotonic() + config.request_timeout_s
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.stream.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    job.cancelled.set()
                    yield f"data: {json.dumps(error_body(504, 'the request took longer than the server limit'))}\n\n"
                    break
                if kind == "delta":
                    yield chunk({"content": value})
                    continue
                if isinstance(value, BaseException):
                    status = getattr(value, "status", 400 if isinstance(value, ValueError) else 500)
                    message = str(value) if status < 500 else "internal server error (logged on the server)"
                    yield f"data: {json.dumps(error_body(status, message))}\n\n"
                    break
                yield chunk({}, _finish(value))
                if include_usage:
                    yield (f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': config.model_name, 'choices': [], 'usage': usage([value])})}\n\n")
                break
            yield "data: [DONE]\n\n"
        finally:
            if not job.future.done():
                job.cancelled.set()  # the client left mid-stream: stop decoding its row

    def conversation(messages: list[schemas.Message]) -> tuple[str, list[tuple[str, str]], str, str]:
        """OpenAI messages -> (the image URL, earlier (question, answer) turns, the new question, system text)."""
        images: list[str] = []
        system: list[str] = []
        turns: list[list[str]] = []  # [role, text]
        for m in messages:
            if isinstance(m.content, list):
                text = " ".join(p.text for p in m.content if isinstance(p, schemas.TextPart)).strip()
                urls = [p.image_url.url for p in m.content if isinstance(p, schemas.ImagePart)]
                if urls and m.role != "user":
                    raise ApiError(400, "images go in user messages", param="messages")
                images += urls
            else:
                text = (m.content or "").strip()
            if m.role in ("system", "developer"):
                system.append(text)
            elif turns and turns[-1][0] == m.role:  # consecutive messages of one role read as one
                turns[-1][1] = f"{turns[-1][1]} {text}".strip()
            else:
                turns.append([m.role, text])
        distinct = list(dict.fromkeys(images))
        if not distinct:
            raise ApiError(400, "the conversation has no image: add an image_url part to a user message",
                           param="messages")
        if len(distinct) > 1:
            raise ApiError(400, f"one image per conversation (BLIP-2 reads one image), got {len(distinct)}",
                           param="messages")
        if not turns or turns[-1][0] != "user":
            raise ApiError(400, "the last message must be the user's", param="messages")
        if turns[0][0] == "assistant":
            turns.insert(0, ["user", ""])
        history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
        return distinct[0], history, turns[-1][1], " ".join(s for s in system if s)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        authorize(request)
        body, _ = await parse(request, schemas.EmbeddingRequest)
        check_model(body.model)
        need_heads("/v1/embeddings")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or len(inputs) > schemas.MAX_TEXTS:
            raise ApiError(400, f"input must hold 1 to {schemas.MAX_TEXTS} items", param="input")
        kinds = ["image" if _is_image_ref(x) else "text" for x in inputs]
        imgs = {i: await image_ref(await media(x)) for i, (x, k) in enumerate(zip(inputs, kinds)) if k == "image"}
        texts = {i: x for i, (x, k) in enumerate(zip(inputs, kinds)) if k == "text"}

        def embed(e: Engine) -> tuple[dict[int, np.ndarray], int]:
            out: dict[int, np.ndarray] = {}
            if imgs:
                feats = e.features(list(imgs.values()))
                vecs = e.blip2._image_itc(feats)  # (B, Q, E), normalised
                for i, v in zip(imgs, vecs):
                    out[i] = v.float().cpu().numpy()
            if texts:
                vecs = e.blip2._text_itc(list(texts.values()))  # (B, E), normalised
                for i, v in zip(texts, vecs):
                    out[i] = v.float().cpu().numpy()
            counted = sum(len(ids) for ids in e.blip2.qformer_tokenizer(list(texts.values()))["input_ids"]) if texts else 0
            return out, counted

        vectors, n_text = await run_call(request, embed)
        data = []
        for i in range(len(inputs)):
            v = vectors[i]
            flat = v.reshape(-1).astype("<f4")
            emb = base64.b64encode(flat.tobytes()).decode() if body.encoding_format == "base64" else flat.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb, "kind": kinds[i], "shape": list(v.shape)})
        return {"object": "list", "data": data, "model": config.model_name,
                "usage": {"prompt_tokens": n_text, "total_tokens": n_text}}

    # -- BLIP-2's own routes ------------------------------------------------------------------------------
    async def one_image(body, uploads: dict, key: str = "image") -> MediaImage:
        if key in uploads:
            return uploads[key][0]
        return await media(getattr(body, key))

    @app.post("/v1/caption")
    async def caption(request: Request):
        authorize(request)
        body, uploads = await parse(request, schemas.CaptionRequest, files=("image",))
        need_llm("/v1/caption")
        prompt = body.prompt or ""
        gen = generation(CAPTION_DEFAULTS, body.settings())
        img = await one_image(body, uploads)
        await check_prompts([prompt], gen["max_new_tokens"])
        # The caption prompt is the instruction: a Q-Former that reads one reads it too (as Blip2.caption).
        job = GenerationJob(asyncio.get_running_loop(), await image_ref(img), prompt, prompt, gen)
        t0 = time.perf_counter()
        (result,) = await run(request, [job])
        return {"caption": result.text, "finish_reason": _finish(result), "usage": usage([result]),
                "model": config.model_name, "seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/v1/ask")
    async def ask(request: Request):
        authorize(request)
        body, uploads = await parse(request, schemas.AskRequest, files=("image",))
        need_llm("/v1/ask")
        prompts = [blip2.question_template.format(q) for q in body.questions]
        gen = generation(VQA_DEFAULTS, body.settings())
        img = await one_image(body, uploads)
        await check_prompts(prompts, gen["max_new_tokens"])
        ref = await image_ref(img)
        loop = asyncio.get_running_loop()
        jobs = [GenerationJob(loop, ref, p, q, gen) for p, q in zip(prompts, body.questions)]
        t0 = time.perf_counter()
        results = await run(request, jobs)
        return {"answers": [r.text for r in results], "usage": usage(results), "model": config.model_name,
                "seconds": round(time.perf_counter() - t0, 4)}

    @app.post("/v1/itm")
    async def itm(request: Request):
        authorize(request)
        body, uploads = await parse(request, schemas.ItmRequest, files=("image",))
        need_heads("/v1/itm")
        ref = await image_ref(await one_image(body, uploads))
        texts = body.texts

        def score(e: Engine) -> list[dict]:
            feats = e.features([ref])
            probs = _itm_probs(e, feats.expand(len(texts), -1, -1), texts)
            sims = max_over_queries(e.blip2._image_itc(feats), e.blip2._text_itc(texts))[0].float().tolist()
            return [{"text": t, "match": p, "similarity": s} for t, p, s in zip(texts, probs, sims)]

        return {"results": await run_call(request, score), "model": config.model_name}

    @app.post("/v1/retrieve")
    async def retrieve(request: Request):
        authorize(request)
        body, uploads = await parse(request, schemas.RetrieveRequest, files=("images",))
        need_heads("/v1/retrieve")
        imgs = uploads.get("images") or [await media(u) for u in body.images]
        refs = [await image_ref(i) for i in imgs]
        text, k = body.text, min(body.k, len(refs))

        def rank(e: Engine) -> list[dict]:
            feats = e.features(refs)
            (hits,) = e.blip2.retrieve([text], feats, k=k)
            return [{"index": h.index, "match": h.itm, "similarity": h.itc, "score": h.score} for h in hits]

        return {"results": await run_call(request, rank), "model": config.model_name}

    @app.post("/v1/search")
    async def search(request: Request):
        authorize(request)
        if photo_index is None:
            raise ApiError(400, "this server has no photo index: start it with --index INDEX (built by blip2 index)")
        need_heads("/v1/search")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        query_image = None
        if isinstance(body, dict) and isinstance(body.get("image"), str):
            query_image = (await media(body["image"])).image
        from blip2.collections.search import search_route_payload

        def run_search(e: Engine) -> dict:
            return search_route_payload(e.blip2, photo_index, body,
                                        load_image=(lambda _: query_image) if query_image is not None else None)

        payload = await run_call(request, run_search)
        payload["model"] = config.model_name
        return payload

    return app


def _itm_probs(e: Engine, feats: torch.Tensor, texts: list[str]) -> list[float]:
    """ITM match probabilities of (image features row, text) pairs, in the worker's batch size."""
    out: list[float] = []
    step = e.blip2.batch_size
    for start in range(0, len(texts), step):
        ids, mask = e.blip2._qformer_text(texts[start : start + step])
        logits = e.blip2.model.itm_logits(feats[start : start + step], ids, mask)
        out += logits.float().softmax(-1)[:, 1].tolist()
    return out


def _finish(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _is_image_ref(text: str) -> bool:
    return text.startswith(("data:image/", "http://", "https://", "file://"))
