"""Request bodies. Unknown fields are errors (a typo must not be ignored silently); OpenAI's own fields keep
OpenAI's names so its clients work unchanged, BLIP-2's routes use the library's names."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_QUESTIONS = 64
MAX_TEXTS = 256
MAX_IMAGES = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- OpenAI chat completions ------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; BLIP-2 has one resolution


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extensions (vLLM passes such extras the same way, through the client's `extra_body`).
    num_beams: int | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(default=None, ge=0)


class EmbeddingRequest(_Strict):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


# -- BLIP-2's own routes -----------------------------------------------------------------------------------
class Generation(_Strict):
    """The library's generation settings (blip2.inference.generation.SETTINGS); unset keeps its defaults."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None
    seed: int | None = None

    def settings(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k in Generation.model_fields and v is not None}


class CaptionRequest(Generation):
    image: str
    prompt: str | None = None


class AskRequest(Generation):
    image: str
    questions: list[str] = Field(min_length=1, max_length=MAX_QUESTIONS)


class ItmRequest(_Strict):
    image: str
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)


class RetrieveRequest(_Strict):
    text: str
    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES)
    k: int = Field(default=5, ge=1)
